"""The ``train-cats`` flow: ensure_dataset -> train_classifier + train_dit -> evaluate.

Run it in-process on an ephemeral Prefect server (``python -m flows.train_cats --help``, or the
``train-cats`` console script), or through the deployments in ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT
from prefect.settings import temporary_settings
from pydantic import BaseModel, ConfigDict, Field

from data.dataset import DatasetSpec, default_data_dir, local_path, read_manifest
from tasks import backend, trainers
from tasks.backend import DEFAULT_GPU
from tasks.ensure_dataset import ensure_dataset
from tasks.evaluate import evaluate
from tasks.steps import evaluate_task, run_prefix, train_classifier_task, train_dit_task

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
TRAIN_TASKS = {"classifier": train_classifier_task, "dit": train_dit_task}


class TrainingParams(BaseModel):
    """One model's training: a named preset plus field overrides."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(
        None,
        description="cpu-tiny (CI, seconds), cpu-small (10 minutes per model on 2 CPU cores) "
        "or gpu (Modal). Empty: gpu with backend=modal, cpu-small locally.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='Config fields replacing the preset\'s, e.g. {"steps": 2000, '
        '"time_budget_minutes": 10}. Unknown fields are rejected before any work starts.',
    )


class ComputeParams(BaseModel):
    """Where the steps run."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "modal"] = Field(
        "local",
        description="local: every step in this process, one training after the other. modal: "
        "each step in its own Modal container, the trainings concurrently on GPUs (needs "
        "credentials and `modal deploy tasks/modal_app.py`).",
    )
    gpu: str = Field(
        DEFAULT_GPU,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9:+\-]*$",
        description="Modal GPU type for training and evaluation: T4, L4, A10G, L40S, A100-80GB, "
        "H100, or e.g. H100:2 for two. Ignored with backend=local.",
    )


class EvaluationParams(BaseModel):
    """Whether and how to evaluate the trained models."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Evaluate the trained models and publish a report.")
    samples_per_class: int = Field(
        16, ge=1, le=1024, description="DiT samples generated per class for the grid and metrics."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Further keyword arguments of tasks.evaluate.evaluate (sampler, steps, CFG "
        "scale ...).",
    )


def plan(
    dataset: DatasetSpec,
    models: list[str],
    training: dict[str, TrainingParams],
    compute: ComputeParams,
    evaluation: EvaluationParams,
) -> tuple[DatasetSpec, dict[str, str]]:
    """Validate everything before any work: presets, overrides, credentials, source, options.

    Returns the dataset spec extended with every image size the trainings need, and the preset
    chosen per model. Raises ValueError or ``backend.ModalUnavailableError`` naming the fix.
    """
    if not models:
        raise ValueError("models is empty: choose 'classifier', 'dit' or both")
    accepted = set(inspect.signature(evaluate).parameters) - {"dataset", "classifier", "dit", "out"}
    unknown = sorted(set(evaluation.options) - accepted)
    if unknown:
        raise ValueError(f"unknown evaluation option(s) {unknown}; valid: {sorted(accepted)}")
    if compute.backend == "modal":
        backend.require_modal_credentials()
        if not dataset.source.startswith(("http://", "https://", "/data/")):
            raise ValueError(
                f"dataset.source {dataset.source!r} is not reachable from a Modal container: "
                "pass an http(s):// URL, or upload the archive with `modal volume put "
                "train-cats-data <file> /archives/` and pass /data/archives/<file>"
            )
    else:
        _require_local_source(dataset)
    default_preset = "gpu" if compute.backend == "modal" else "cpu-small"
    presets = {m: training[m].preset or default_preset for m in models}
    sizes = {trainers.build_config(m, presets[m], training[m].overrides).image_size for m in models}
    # Validated again (model_copy would not), so a trained size beyond the spec's bounds is
    # refused here, naming the field, instead of packing a gigantic cache.
    spec = {**dataset.model_dump(), "image_sizes": sorted(sizes | set(dataset.image_sizes))}
    return DatasetSpec.model_validate(spec), presets


def _require_local_source(dataset: DatasetSpec) -> None:
    """A local archive must exist, unless its version is already published (then it is reused
    without reading the archive)."""
    if dataset.source.startswith(("http://", "https://")):
        return
    if local_path(dataset.source).is_file():
        return
    if read_manifest(default_data_dir() / dataset.version_id()) is None:
        raise ValueError(
            f"dataset.source {dataset.source!r} is not a file ({local_path(dataset.source)}); "
            "pass an existing archive path, a file:// URL or an http(s):// URL (--source)"
        )


@flow(
    name="train-cats",
    on_cancellation=[backend.cancel_recorded_calls],
    on_crashed=[backend.cancel_recorded_calls],
    on_failure=[backend.cancel_recorded_calls],
)
def train_cats(
    dataset: DatasetSpec = DatasetSpec(),  # noqa: B008 - pydantic defaults render the UI form
    models: list[Literal["classifier", "dit"]] = ["classifier", "dit"],  # noqa: B006
    classifier: TrainingParams = TrainingParams(),  # noqa: B008
    dit: TrainingParams = TrainingParams(),  # noqa: B008
    compute: ComputeParams = ComputeParams(),  # noqa: B008
    evaluation: EvaluationParams = EvaluationParams(),  # noqa: B008
) -> dict:
    """Build or reuse the dataset, train the chosen models, evaluate them; return a summary."""
    models = sorted(set(models))
    training = {"classifier": classifier, "dit": dit}
    spec, presets = plan(dataset, models, training, compute, evaluation)
    ref = ensure_dataset(spec, backend=compute.backend).model_dump(mode="json")
    prefix = run_prefix()
    train = {
        m: dict(
            dataset=ref,
            run_name=f"{prefix}/{m}",
            preset=presets[m],
            overrides=training[m].overrides,
            backend_name=compute.backend,
            gpu=compute.gpu,
        )
        for m in models
    }
    if compute.backend == "modal":  # separate GPU containers: run both at once
        futures = {m: TRAIN_TASKS[m].submit(**train[m]) for m in models}
        results = {m: f.result() for m, f in futures.items()}
    else:  # one machine: one after the other
        results = {m: TRAIN_TASKS[m](**train[m]) for m in models}
    report = None
    if evaluation.enabled:
        report = evaluate_task(
            ref,
            out=f"{prefix}/report",
            classifier=train.get("classifier", {}).get("run_name"),
            dit=train.get("dit", {}).get("run_name"),
            options={"samples_per_class": evaluation.samples_per_class, **evaluation.options},
            backend_name=compute.backend,
            gpu=compute.gpu,
        )
    return {
        "dataset_version": ref["version"],
        "run_dirs": {m: r["run_dir"] for m, r in results.items()},
        "metrics": {m: r.get("metrics", {}) for m, r in results.items()},
        "report": report,
    }


# --------------------------------------------------------------------------- command line

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
    p.add_argument("--models", nargs="+", choices=trainers.MODELS, help="models to train")
    p.add_argument("--preset", help="preset for every trained model (cpu-tiny, cpu-small, gpu)")
    p.add_argument("--source", help="dataset archive: http(s):// URL, file:// URL or path")
    p.add_argument("--checksum", help="expected archive digest, ALGO:HEX")
    p.add_argument("--labels", choices=["breed", "species"], help="label mode")
    p.add_argument("--backend", choices=["local", "modal"], help="where the steps run")
    p.add_argument("--gpu", help="Modal GPU type (backend=modal)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation step")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the parameters, run nothing"
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
        flags.update({m: {"preset": args.preset} for m in trainers.MODELS})
    if args.no_evaluate:
        flags["evaluation"] = {"enabled": False}
    return _merge(params, _drop_none(flags))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        kept = {k: _drop_none(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return value


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
            options = params.setdefault("evaluation", {}).setdefault("options", {})
            options.setdefault("deployment", args.deployment)
        bound = train_cats.validate_parameters(params)
        models = sorted(set(bound.get("models", ["classifier", "dit"])))
        spec, presets = plan(
            bound.get("dataset", DatasetSpec()),
            models,
            {m: bound.get(m, TrainingParams()) for m in trainers.MODELS},
            bound.get("compute", ComputeParams()),
            bound.get("evaluation", EvaluationParams()),
        )
    except (ValueError, OSError, ParameterTypeError, backend.ModalUnavailableError) as exc:
        print(f"train-cats: {exc}", file=sys.stderr)
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
