"""The flow's parameters (typed, so the Prefect UI renders a form) and the plan that validates
them all before any work starts."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.dataset import DatasetSpec, default_data_dir, local_path, read_manifest
from tasks.adapters.costs import parse_gpu
from tasks.adapters.limits import DEFAULT_MAX_QUEUE_MINUTES
from tasks.champions import PREFIX, missing_export
from tasks.configs import MODELS, ModelName, build_config
from tasks.evaluation.options import EvalOptions
from tasks.paths import APP_NAME, DEFAULT_GPU


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

    backend: Literal["auto", "local", "modal"] = Field(
        "local",
        description="local: every step in this process, one training after the other. modal: "
        "each step in its own Modal container, the trainings concurrently on GPUs (needs "
        "credentials and `modal deploy tasks/adapters/modal_app.py`). auto (the deployments' "
        "value): modal when this process has Modal credentials and the app is deployed, else "
        "local; the run's `backend` artifact says which and why.",
    )
    gpu: str = Field(
        DEFAULT_GPU,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9:+\-]*$",
        description="Modal GPU type for training and evaluation: T4, L4, A10G, L40S, A100-80GB, "
        "H100, or e.g. H100:2 for two. Ignored with backend=local.",
    )
    max_queue_minutes: float = Field(
        DEFAULT_MAX_QUEUE_MINUTES,
        gt=0,
        description="Modal: cancel a call and fail the run when it has not got a container (no "
        "GPU free) within this many minutes. Ignored with backend=local.",
    )

    @model_validator(mode="after")
    def _gpu_has_a_price(self) -> ComputeParams:
        # On Modal the run publishes the most it can cost, which needs the GPU's price.
        if self.backend == "modal":
            parse_gpu(self.gpu)
        return self


class EvaluationParams(EvalOptions):
    """Whether and how to evaluate the trained models (every option of `tasks.evaluate`)."""

    enabled: bool = Field(True, description="Evaluate the trained models and publish a report.")

    def options(self) -> EvalOptions:
        """The evaluation options alone, as given (unset fields keep their defaults)."""
        return EvalOptions.model_validate(self.model_dump(exclude={"enabled"}, exclude_unset=True))


class FlowParameters(BaseModel):
    """Every parameter of the ``train-cats`` flow, as its signature declares them (names, types,
    defaults: tests/test_first_contact.py checks that they agree), so that the command line
    validates a run's parameters as Prefect does, before it imports Prefect."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    models: list[ModelName] = Field(default_factory=lambda: list(MODELS))
    classifier: TrainingParams = Field(default_factory=TrainingParams)
    dit: TrainingParams = Field(default_factory=TrainingParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    force: bool = Field(
        False,
        description="Retrain even when nothing changed since the deployment's champions (data "
        "revision, code, config); only deployment runs check for changes.",
    )


def plan(
    dataset: DatasetSpec,
    models: list[str],
    training: dict[str, TrainingParams],
    compute: ComputeParams,
    evaluation: EvaluationParams,
    check_network: bool = True,
) -> tuple[DatasetSpec, dict[str, str]]:
    """Validate everything before any work: backend, presets, overrides, credentials, source.

    ``compute.backend="auto"`` is resolved first (``resolve_backend``; the flow resolves it
    before calling, to publish the choice), since the presets' default depends on it. Returns
    the dataset spec extended with every image size the trainings need, and the preset chosen
    per model. Raises ValueError or ``ModalUnavailableError`` (from
    ``tasks.adapters.modal_calls``, imported for backend=modal only) naming the fix.
    """
    if not models:
        raise ValueError("models is empty: choose 'classifier', 'dit' or both")
    compute, _ = resolve_backend(compute, check_app=check_network)
    if compute.backend == "modal":
        from tasks.adapters import modal_calls  # Prefect and Modal: only when they are needed

        modal_calls.require_modal_credentials()
        if not dataset.source.startswith(("http://", "https://", "/data/")):
            raise ValueError(
                f"dataset.source {dataset.source!r} is not reachable from a Modal container: "
                "pass an http(s):// URL, or upload the archive with `modal volume put "
                "train-cats-data <file> /archives/` and pass /data/archives/<file>"
            )
    default_preset = "gpu" if compute.backend == "modal" else "cpu-small"
    presets = {m: training[m].preset or default_preset for m in models}
    configs = {m: build_config(m, presets[m], training[m].overrides) for m in models}
    if compute.backend == "modal":
        _require_even_split(configs, compute.gpu)
    if "dit" in configs:
        dit, explicit = configs["dit"], teacher_is_explicit(training["dit"].overrides)
        _require_reachable_teacher(
            dit.repa_teacher, compute.backend, explicit or not dit.repa_optional
        )
    sizes = {config.image_size for config in configs.values()}
    # Validated again (model_copy would not), so a trained size beyond the spec's bounds is
    # refused here, naming the field, instead of packing a gigantic cache.
    spec = {**dataset.model_dump(), "image_sizes": sorted(sizes | set(dataset.image_sizes))}
    validated = DatasetSpec.model_validate(spec)
    if compute.backend == "local":  # last: the one check that may touch the network (DNS)
        _require_local_source(dataset, check_network)
    return validated, presets


NO_CREDENTIALS = (
    "no Modal credentials (set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, run `modal token new` for "
    "~/.modal.toml, or give the worker Secret blocks: see README, Credentials)"
)


def resolve_backend(compute: ComputeParams, check_app: bool = True) -> tuple[ComputeParams, str]:
    """``compute`` with ``backend="auto"`` resolved to modal or local, and the reason in words.

    auto: modal when the Modal client has credentials (MODAL_TOKEN_ID/SECRET in the environment,
    e.g. from the work pool's Secret blocks, or ~/.modal.toml) and the app is deployed (one
    bounded Modal API call; skipped without ``check_app``); local when it has none. An explicit
    backend is kept as given. Everything after this sees only local or modal.

    Raises:
        ModalUnavailableError: auto found credentials, but the app is not deployed (the message
            names `modal deploy`), Modal refused them, or Modal did not answer in time.
    """
    if compute.backend != "auto":
        return compute, f"compute.backend={compute.backend!r} was given"
    source = None
    if modal_credentials_may_exist():  # else local without importing Modal or Prefect (the CLI)
        from tasks.adapters import modal_access

        source = modal_access.modal_credentials_source()
    if source is None:
        chosen, why = "local", NO_CREDENTIALS
    elif not check_app:
        chosen, why = "modal", f"credentials from {source} (app deployment not checked)"
    else:
        modal_access.require_app_deployed(source)
        chosen, why = "modal", f"credentials from {source} and app {APP_NAME!r} deployed"
    # Validated again, so a modal choice checks compute.gpu's price as an explicit one does.
    return ComputeParams.model_validate({**compute.model_dump(), "backend": chosen}), why


def modal_credentials_may_exist() -> bool:
    """False when the Modal client cannot have a token: neither MODAL_TOKEN_* variables nor its
    config file (MODAL_CONFIG_PATH, else ~/.modal.toml)."""
    if os.environ.get("MODAL_TOKEN_ID") or os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    path = os.environ.get("MODAL_CONFIG_PATH") or os.path.expanduser("~/.modal.toml")
    return os.path.isfile(path)


def _require_even_split(configs: dict[str, Any], gpu: str) -> None:
    """With several GPUs a container trains with DDP, one process per GPU, each taking an equal
    share of the global batch (docs/distributed.md): the batch must split evenly over them."""
    from tasks.adapters.costs import parse_gpu

    _, count = parse_gpu(gpu)
    for model, config in configs.items():
        if config.batch_size % count:
            raise ValueError(
                f"{model}.batch_size={config.batch_size} does not split over the {count} GPUs of "
                f"compute.gpu={gpu!r}: ask for a GPU count that divides it, or override "
                f"{model}.overrides.batch_size"
            )


def _require_local_source(dataset: DatasetSpec, check_network: bool) -> None:
    """The source must be readable from here: a local archive that exists, or a URL whose host
    resolves; unless its version is already published (then it is reused without the source)."""
    if read_manifest(default_data_dir() / dataset.version_id()) is not None:
        return
    if dataset.source.startswith(("http://", "https://")):
        if check_network:
            _require_resolvable(dataset.source)
    elif not local_path(dataset.source).is_file():
        raise ValueError(
            f"dataset.source {dataset.source!r} is not a file ({local_path(dataset.source)}); "
            "pass an existing archive path, a file:// URL or an http(s):// URL as dataset.source"
        )


def teacher_is_explicit(overrides: dict[str, Any]) -> bool:
    """Whether the user named the DiT's REPA teacher (`repa_teacher` in the overrides) without
    a `repa_fallback` of their own: then the teacher is required, so that a misspelt champion
    fails in one line instead of quietly training without it (`cpu-small`'s fallback is for its
    own teacher, the `classifier` deployment's champion)."""
    return overrides.get("repa_teacher") is not None and "repa_fallback" not in overrides


def _require_reachable_teacher(teacher: str | None, backend: str, required: bool = True) -> None:
    """REPA's teacher is loaded where the DiT trains, after the dataset is built: check now that
    it can be, rather than in a GPU container or after a download. Locally, the folder (or the
    champion's run dir) must hold an export; a Modal container sees only its volumes, so there it
    must be a champion or a folder on the runs volume (the container reads the champion). A
    champion teacher that is not `required` (`DiTConfig.repa_optional`) may be missing: the flow
    then trains without it (`tasks.adapters.lifecycle.choose_repa`)."""
    if teacher is None:
        return
    if backend == "modal":
        if not teacher.startswith((PREFIX, "/runs/")):  # modal_app.RUNS_MOUNT, without Modal
            raise ValueError(
                f"dit.repa_teacher {teacher!r} is not reachable from a Modal container: pass "
                f"{PREFIX}<deployment> or a classifier export on the runs volume "
                "(/runs/<run name>/classifier)"
            )
        return
    if required and (why := missing_export(teacher, "classifier")) is not None:
        raise ValueError(f"dit.repa_teacher {teacher!r}: {why}")


def _require_resolvable(url: str) -> None:
    """Resolve the URL's host now, so that offline or a typo fails in a second, before any
    server starts. A host that resolves but does not answer is left to the retried task."""
    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(
            f"dataset.source host {host!r} does not resolve ({exc.__class__.__name__}: offline, "
            "or a typo?): pass a reachable URL or a local archive path as dataset.source"
        ) from None
