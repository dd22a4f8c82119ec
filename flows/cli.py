"""The command line of the flow: ``python -m flows.train_cats`` and the ``train-cats`` script.

It runs the flow in this process on a temporary Prefect server. Parameters come from a
``prefect.yaml`` deployment (``--deployment``), then ``--params``, then the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT
from prefect.settings import temporary_settings

from data.dataset import DatasetSpec
from data.errors import one_line
from flows.parameters import ComputeParams, EvaluationParams, TrainingParams, plan
from flows.train_cats import train_cats
from tasks.adapters import modal_calls as backend
from tasks.train import MODELS

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"

FLOW_PARAMETERS = tuple(inspect.signature(train_cats.fn).parameters)


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
    p = argparse.ArgumentParser(
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
    p.add_argument("--backend", choices=["local", "modal"], help="where the steps run")
    p.add_argument("--gpu", help="Modal GPU type (backend=modal)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation step")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the parameters, run nothing (the source's host is not resolved)",
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
    return _merge(params, _drop_none(flags))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        kept = {k: _drop_none(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return value


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence one logger for the duration (restored after, whatever happens)."""
    log = logging.getLogger(logger)
    before, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = before


def _one_line(exc: Exception) -> str:
    """Every early error as one line. Prefect lists a parameter's errors one per line under a
    heading ("Flow run received invalid parameters:\n - field: reason"): join them."""
    if isinstance(exc, ParameterTypeError):
        lines = [line.strip().lstrip("- ") for line in str(exc).splitlines()[1:] if line.strip()]
        return "invalid parameters: " + "; ".join(
            line.replace("Value error, ", "") for line in lines
        )
    return one_line(exc)


def _patient_temporary_server() -> contextlib.AbstractContextManager:
    """Wait up to 120 s (Prefect's default: 20) for the temporary server to start: on a busy
    2-core machine its first start (a fresh database and its migrations) overran 20 s and failed
    the run. Only the default changes, so a PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS set
    in the environment or the active Prefect profile still wins."""
    return temporary_settings(set_defaults={STARTUP_TIMEOUT: 120})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flows.train_cats`` and the ``train-cats`` console script.

    Exit status: 0 done, 2 invalid parameters (nothing ran), 1 the flow run failed.
    """
    args = build_parser().parse_args(argv)
    # The temporary server would otherwise try to send telemetry, which fails offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        params = parameters_from_args(args)
        if args.deployment:  # report history and deltas per deployment, as on a worker
            params.setdefault("evaluation", {}).setdefault("deployment", args.deployment)
        with _quiet("prefect.flows"):  # it logs the raw errors we print as one line below
            bound = train_cats.validate_parameters(params)
        models = sorted(set(bound.get("models", ["classifier", "dit"])))
        spec, presets = plan(
            bound.get("dataset", DatasetSpec()),
            models,
            {m: bound.get(m, TrainingParams()) for m in MODELS},
            bound.get("compute", ComputeParams()),
            bound.get("evaluation", EvaluationParams()),
            check_network=not args.dry_run,
        )
    except (ValueError, OSError, ParameterTypeError, backend.ModalUnavailableError) as exc:
        print(f"train-cats: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.dry_run:
        resolved = {"dataset": spec.model_dump(mode="json"), "presets": presets}
        print(json.dumps({"parameters": params, "resolved": resolved}, indent=2))
        return 0
    try:
        with _patient_temporary_server():
            summary = train_cats(**params)
    except Exception as exc:  # Prefect has logged the traceback; end on the one line that matters
        print(f"train-cats: the flow run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
