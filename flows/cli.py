"""The command line of the flow: ``python -m flows.train_cats`` and the ``train-cats`` script.

It runs the flow in this process on a temporary Prefect server. Parameters come from a
``prefect.yaml`` deployment (``--deployment``), then ``--params``, then the flags.

Every parameter is checked before Prefect and torch are imported (seconds), so ``--help`` and bad
input answer in a fraction of a second. Errors end on one line in the words of this command line
(``--source``, where a deployment run says ``dataset.source``); ``--verbose`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from data.errors import DATASET_FLAGS, DatasetError, OneLineParser, in_flags, print_error
from flows.parameters import FlowParameters, modal_credentials_may_exist, plan
from tasks.configs import MODELS

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"

FLOW_PARAMETERS = tuple(FlowParameters.model_fields)
# The parameter paths that messages name, as this command line's flags.
FLAGS = {**DATASET_FLAGS, "compute.backend": "--backend", "compute.gpu": "--gpu"}


def deployment_parameters(name: str, path: Path = PREFECT_YAML) -> dict[str, Any]:
    """The ``parameters`` of deployment ``name`` (e.g. ``"dit"``) in ``prefect.yaml``.

    Raises:
        ValueError: no such deployment (the message lists the names there are).
    """
    deployments = yaml.safe_load(path.read_text()).get("deployments") or []
    for deployment in deployments:
        if deployment.get("name") == name:
            return dict(deployment.get("parameters") or {})
    names = [d.get("name") for d in deployments]
    raise ValueError(f"no deployment {name!r} in {path}; choose one of {names}")


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train-cats",
        description="Run the train-cats flow in this process (ephemeral Prefect server). "
        "Parameters come from --deployment, then --params, then the flags below.",
    )
    p.add_argument(
        "--deployment",
        help="start from this prefect.yaml deployment's parameters (dit, classifier, all)",
    )
    p.add_argument("--params", help="JSON object of flow parameters merged on top (or @file.json)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="models to train")
    p.add_argument("--preset", help="preset for every trained model (cpu-tiny, cpu-small, gpu)")
    p.add_argument("--source", help="dataset archive: http(s):// URL, file:// URL or path")
    p.add_argument("--checksum", help="expected archive digest, ALGO:HEX")
    p.add_argument("--labels", choices=["breed", "species"], help="label mode")
    p.add_argument("--backend", choices=["auto", "local", "modal"], help="where the steps run")
    p.add_argument("--gpu", help="Modal GPU type (backend=modal)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation step")
    p.add_argument(
        "--force", action="store_true", help="retrain even if nothing changed (deployment runs)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the parameters, run nothing (the source's host is not resolved)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="on a failure, print the full traceback (and Prefect's own error logs)",
    )
    return p


def parameters_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge deployment parameters, ``--params`` and flags into the flow's parameters."""
    params = deployment_parameters(args.deployment) if args.deployment else {}
    if args.params:
        text = Path(args.params[1:]).read_text() if args.params.startswith("@") else args.params
        try:
            extra = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--params is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict) or not set(extra) <= set(FLOW_PARAMETERS):
            raise ValueError(
                f"--params must be a JSON object whose keys are flow parameters {FLOW_PARAMETERS}; "
                f"got {text[:200]}"
            )
        params = _merge(params, extra)
    flags: dict[str, Any] = {
        "dataset": {"source": args.source, "checksum": args.checksum, "labels": args.labels},
        "compute": {"backend": args.backend, "gpu": args.gpu},
        "models": args.models,
    }
    if args.preset:
        flags.update({m: {"preset": args.preset} for m in MODELS})
    if args.no_evaluate:
        flags["evaluation"] = {"enabled": False}
    if args.force:
        flags["force"] = True
    return _merge(params, _drop_none(flags))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        kept = {k: _drop_none(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return value


class _ForTheCommandLine(logging.Formatter):
    """Prefect's console lines in this command line's words (flags for parameter paths)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return in_flags(self.inner.format(record), FLAGS)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def _console(verbose: bool) -> Iterator[None]:
    """Prefect's console output during the run. Without ``verbose``, records at ERROR and above
    (failures, with their tracebacks) stay in the run's logs, which keep them in full, and out of
    the console: the command line reports the failure itself, on one line."""
    if verbose:
        yield
        return
    handlers = [
        h
        for name in (None, "uvicorn", "fastapi")
        for h in logging.getLogger(name).handlers
        if isinstance(h, logging.StreamHandler)
    ]
    saved = [(h, h.formatter) for h in handlers]
    for handler in handlers:
        handler.addFilter(_below_error)
        handler.setFormatter(_ForTheCommandLine(handler.formatter))
    try:
        yield
    finally:
        for handler, formatter in saved:
            handler.removeFilter(_below_error)
            handler.setFormatter(formatter)


def _patient_temporary_server() -> contextlib.AbstractContextManager:
    """Wait up to 120 s (Prefect's default: 20) for the temporary server to start: on a busy
    2-core machine its first start (a fresh database and its migrations) overran 20 s and failed
    the run. Only the default changes, so a PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS set
    in the environment or the active Prefect profile still wins."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT
    from prefect.settings import temporary_settings

    return temporary_settings(set_defaults={TIMEOUT: 120})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flows.train_cats`` and the ``train-cats`` console script.

    Exit status: 0 done, 2 invalid parameters (nothing ran), 1 the flow run failed.
    """
    args = build_parser().parse_args(argv)
    # The temporary server would otherwise try to send telemetry, which fails offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    modal_errors: tuple[type[Exception], ...] = ()
    try:
        params = parameters_from_args(args)
        if args.deployment:  # report history and deltas per deployment, as on a worker
            params.setdefault("evaluation", {}).setdefault("deployment", args.deployment)
        bound = FlowParameters.model_validate(params)
        # Modal checks import the Modal adapter (and Prefect): only when they will run
        if bound.compute.backend == "modal" or (
            bound.compute.backend == "auto" and modal_credentials_may_exist()
        ):
            from tasks.adapters.modal_calls import ModalUnavailableError

            modal_errors = (ModalUnavailableError,)
        spec, presets = plan(
            bound.dataset,
            sorted(set(bound.models)),
            {"classifier": bound.classifier, "dit": bound.dit},
            bound.compute,
            bound.evaluation,
            check_network=not args.dry_run,
        )
    # pydantic's ValidationError is a ValueError
    except (ValueError, OSError, DatasetError, *modal_errors) as exc:
        print_error("train-cats: error: ", exc, args.verbose, FLAGS)
        return 2
    if args.dry_run:
        resolved = {"dataset": spec.model_dump(mode="json"), "presets": presets}
        print(json.dumps({"parameters": params, "resolved": resolved}, indent=2))
        return 0
    return _run(params, args.verbose)


def _run(params: dict[str, Any], verbose: bool) -> int:
    """Run the flow on a temporary server; print its summary, or end on the failure's one line
    (the traceback too for an unexpected error, or with ``verbose``)."""
    from flows.train_cats import train_cats  # Prefect and torch, now that the parameters are good

    try:
        with _patient_temporary_server(), _console(verbose):
            summary = train_cats(**params)
    except Exception as exc:
        if not verbose and not isinstance(exc, DatasetError):  # a bug, not a data problem
            traceback.print_exception(exc)
        print_error(f"train-cats: the flow run failed: {type(exc).__name__}: ", exc, False, FLAGS)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
