"""The retraining life cycle as Prefect tasks: the change check before a scheduled run trains,
and the promotion after it is evaluated (the logic: `tasks.fingerprint`, `tasks.promotion`).

1. `check_for_changes`: asks the source for its revision (a conditional request: 304 moves no
   byte), fingerprints data revision, code and configs, and compares them with the champions of
   this deployment. Nothing changed: the flow ends in a `Completed` state named `Unchanged`,
   with an artifact saying why. Only deployment runs check; `force` trains anyway.
2. `promote_models`: each evaluated model becomes its deployment's champion only if it shows no
   regression against the champion, like for like; the `promotion` artifact shows the deltas.

Both work where the backend keeps its runs: the local runs root, or on Modal the runs volume
(`champions_of` reads the champion records from here; promotion runs in the Modal function
`promote`, next to the reports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run

from data.dataset import DatasetSpec, sha256_file
from data.revision import source_revision
from tasks import champions
from tasks.adapters import modal_calls
from tasks.adapters.prefect_tasks import Backend
from tasks.champions import CHAMPIONS_DIR, Champion, all_champions, champion_path, read_champion
from tasks.configs.dit import DiTConfig
from tasks.evaluation.options import EvalOptions
from tasks.fingerprint import changes, fingerprint
from tasks.paths import RUNS_VOLUME, runs_root
from tasks.promotion import Decision, promote_runs
from tasks.training.export import WEIGHTS


@dataclass
class ChangeCheck:
    """The dataset spec to build (with the source's revision), the run's fingerprint, and the
    differences from the champions (empty: nothing changed)."""

    spec: DatasetSpec
    fingerprint: dict[str, Any]
    changed: list[str]


def is_deployment_run() -> bool:
    """Whether this flow run belongs to a Prefect deployment (scheduled, or started with
    `prefect deployment run`): the runs the life cycle governs."""
    return this_deployment.get_id() is not None


def champions_of(
    backend: Backend, kind: str, deployments: list[str] | None = None
) -> list[Champion]:
    """The `kind` champions of `deployments` (None: of every deployment), newest promotion first,
    from where `backend` keeps its runs: the local runs root, or the Modal runs volume (read from
    this process: no container starts)."""
    if backend == "local":
        if deployments is None:
            return all_champions(kind)
        found = [read_champion(d, kind) for d in deployments]
    else:
        if deployments is None:
            deployments = modal_calls.list_volume_dir(RUNS_VOLUME, CHAMPIONS_DIR)
        found = [_volume_champion(d, kind) for d in deployments]
    return sorted((c for c in found if c), key=lambda c: c.promoted_at, reverse=True)


def _volume_champion(deployment: str, kind: str) -> Champion | None:
    path = champion_path(deployment, kind).relative_to(runs_root()).as_posix()
    try:
        return Champion.model_validate_json(modal_calls.read_volume_file(RUNS_VOLUME, path))
    except FileNotFoundError:
        return None


def find_judge(classes: list[str], backend: Backend, teacher: str | None = None) -> Champion | None:
    """`tasks.champions.find_judge` among the champions where `backend` keeps them, less the
    DiT's REPA `teacher` (`champion:<deployment>` or a run dir): the DiT was trained towards its
    features, which would flatter it as a judge (`tasks.evaluate` refuses that pair)."""
    pool = champions_of(backend, "classifier")
    if teacher:
        pool = [c for c in pool if not _is_teacher(c, teacher, backend)]
    return champions.find_judge(classes, pool)


def _is_teacher(champion: Champion, teacher: str, backend: Backend) -> bool:
    if teacher.startswith(champions.PREFIX):
        return champion.deployment == teacher[len(champions.PREFIX) :]
    if backend == "modal":  # a folder on the runs volume, as the container sees it
        return teacher.rstrip("/") == f"/runs/{champion.run_name}"
    return Path(teacher).expanduser().resolve() == champion.run_dir.resolve()


def choose_repa(
    config: DiTConfig,
    *,
    models: list[str],
    backend: Backend,
    judged: bool,
    classifier_seed: int | None = None,
    labels: str | None = None,
) -> tuple[dict[str, Any], str] | None:
    """Whether a DiT `config` whose REPA teacher may be missing (`DiTConfig.repa_optional`, as
    the `cpu-small` preset's champion) trains with REPA in this run: the overrides that pin the
    choice for the training task, and one line saying what and why. None: nothing to choose.

    REPA is off (x-prediction too: `DiTConfig.without_repa`) where the teacher's export is
    missing, or where a `judged` run would be left without a judge that is not the teacher (the
    DiT was pulled towards its features: `find_judge`, `tasks.evaluate`). With a classifier in
    `models`, that classifier judges: its `classifier_seed` must differ from the teacher's, since
    on the same data and recipe it could be the teacher again, bit for bit. Without one, another
    classifier champion trained on the run's `labels` (the dataset spec's) must exist to judge.

    Raises:
        ValueError: a classifier in `models` without its `classifier_seed`.
    """
    if not config.repa_optional:
        return None
    if "classifier" in models and classifier_seed is None:
        raise ValueError("choose_repa: pass classifier_seed, the seed of the run's classifier")
    teacher, fallback = config.repa_teacher or "", config.repa_fallback
    champion = _teacher_champion(teacher, backend)
    why = _missing_teacher(teacher, champion, backend)
    if why is None and judged:
        why = _no_fair_judge(champion, models, backend, classifier_seed, labels)
    if why is not None:
        off = config.without_repa_fields()
        return off, f"REPA off, predicting {fallback}: teacher {teacher!r}: {why}"
    return {"repa_fallback": "error"}, (
        f"REPA on: block {config.repa_depth} aligns to {teacher!r} (run {champion.run_name})"
    )


def _teacher_champion(teacher: str, backend: Backend) -> Champion | None:
    deployment = teacher[len(champions.PREFIX) :]
    return next(iter(champions_of(backend, "classifier", [deployment])), None)


def _missing_teacher(teacher: str, champion: Champion | None, backend: Backend) -> str | None:
    """Why the champion `teacher` ("champion:<deployment>") cannot teach here, or None: no
    champion, no export, or an export whose feature map is not spatial (e.g. a `cpu-tiny`
    classifier promoted for a quick try), which `tasks.training.repa` would refuse in the
    training task, after the dataset and any classifier training."""
    if champion is None:
        if backend == "local":  # its message names the record and how to get a champion
            return champions.missing_export(teacher, "classifier")
        return f"deployment {teacher[len(champions.PREFIX) :]!r} has no classifier champion yet"
    if backend == "local":  # the export's files, in the champion's run dir
        why = champions.missing_export(champion.run_dir, "classifier")
        if why is not None:
            return why
        text = (champion.run_dir / "config.json").read_text()
    else:
        files = set(modal_calls.list_volume_dir(RUNS_VOLUME, champion.run_name))
        if not {WEIGHTS, "config.json"} <= files:
            return f"no classifier export at /runs/{champion.run_name} on the runs volume"
        text = modal_calls.read_volume_file(RUNS_VOLUME, f"{champion.run_name}/config.json")
    from tasks.training.repa import flat_feature_map  # torch: only when a teacher exists

    return flat_feature_map(json.loads(text))


def _no_fair_judge(
    teacher: Champion,
    models: list[str],
    backend: Backend,
    classifier_seed: int | None,
    labels: str | None,
) -> str | None:
    """Why no classifier but the teacher could judge this run's DiT, or None."""
    if "classifier" in models:
        seed = teacher.fingerprint.get("configs", {}).get("classifier", {}).get("seed")
        if classifier_seed == seed:
            return (
                f"this run's classifier, its judge, has the teacher's seed {classifier_seed}: on "
                "the same data it could be the teacher again; give it another seed "
                '(classifier.overrides {"seed": 1}, as the `all` deployment does)'
            )
        return None
    # Another champion that knows the DiT's classes: the classes come with the dataset, after
    # this choice, so the champion's dataset labels (breed, species) stand in for them.
    others = [
        c
        for c in champions_of(backend, "classifier")
        if c.run_name != teacher.run_name
        and (labels is None or c.fingerprint.get("dataset", {}).get("labels") == labels)
    ]
    if not others:
        return (
            f"it is the only classifier champion trained on {labels or 'these'} labels, and this "
            "DiT's report needs one that is not its teacher as the judge"
        )
    return None


@task(name="check_for_changes", task_run_name="check_for_changes · {deployment}")
def check_for_changes(
    spec: DatasetSpec,
    configs: dict[str, dict],
    models: list[str],
    deployment: str,
    probe: bool,
    backend: Backend = "local",
) -> ChangeCheck:
    """Fingerprint this run and compare it with `deployment`'s champions of `models` (where
    `backend` keeps them).

    `probe`: ask the source for its revision (one conditional request, or a local file's
    sha256); without it the revision stays unset, as for ad-hoc runs. Raises the data errors of
    `data.revision.source_revision` (an unreachable source fails here, before any work).
    """
    champions = {m: next(iter(champions_of(backend, m, [deployment])), None) for m in models}
    if probe:
        known = [c.fingerprint["dataset"].get("source_revision") for c in champions.values() if c]
        revision = source_revision(spec, known[0] if known else None)
        spec = spec.model_copy(update={"source_revision": revision.value})
    configs = {m: _with_teacher_identity(c, backend) for m, c in configs.items()}
    current = fingerprint(spec.model_dump(mode="json"), configs)
    changed = sorted({line for m in models for line in _changes(current, champions[m], m)})
    return ChangeCheck(spec, current, changed)


def teacher_identity(teacher: str, backend: Backend = "local") -> str:
    """What a REPA teacher named by `teacher` is now: for `champion:<deployment>`, the run dir of
    that deployment's classifier champion (where `backend` keeps it); for an export folder, the
    sha256 of its weights. The name alone stays the same when a newer champion or an overwritten
    export changes the features that the DiT is aligned to."""
    if teacher.startswith(champions.PREFIX):
        found = champions_of(backend, "classifier", [teacher[len(champions.PREFIX) :]])
        return f"run {found[0].run_name}" if found else "no classifier champion yet"
    weights = Path(teacher).expanduser() / WEIGHTS
    if not weights.is_file():
        return f"{weights} not readable from the flow"
    return "sha256:" + sha256_file(weights)


def _with_teacher_identity(config: dict[str, Any], backend: Backend) -> dict[str, Any]:
    teacher = config.get("repa_teacher")
    if not teacher:
        return config
    return {**config, "repa_teacher_identity": teacher_identity(teacher, backend)}


def _changes(current: dict[str, Any], champion: Champion | None, model: str) -> list[str]:
    if champion is None:
        return [f"no {model} champion yet"]
    return changes(current, champion.fingerprint)


def publish_change_check(
    check: ChangeCheck, deployment: str, force: bool, governed: bool = True
) -> None:
    """A markdown artifact (key `change-check`) and a log line: why this run trains or not.
    `governed`: a deployment run, which an unchanged fingerprint skips; an in-process run of the
    command line always trains."""
    if check.changed:
        verdict = "retrains: " + "; ".join(check.changed)
    elif force:
        verdict = "retrains because force=true, although nothing changed"
    elif not governed:
        verdict = "trains: an in-process run always does (only deployment runs skip), although "
        verdict += "nothing changed since the champions"
    else:
        verdict = (
            "is skipped: nothing changed since the champions (retrain with force=true: "
            "`--param force=true` on `prefect deployment run`)"
        )
    get_run_logger().info("deployment %s %s", deployment, verdict)
    lines = "\n".join(f"- {line}" for line in check.changed) or "- nothing"
    create_markdown_artifact(
        key="change-check",
        markdown=f"## Change check: `{deployment}` {verdict}\n\n**Changed since the champions:**"
        f"\n\n{lines}\n\n**Code:** `{check.fingerprint['code'][:23]}…`  \n**Data revision:** "
        f"`{check.fingerprint['dataset'].get('source_revision')}`",
        description=f"Why this {deployment} run trains or not",
    )


@task(name="promote", task_run_name="promote · {deployment}")
def promote_models(
    deployment: str,
    run_names: dict[str, str],
    report_dir: str,
    dataset: dict,
    options: EvalOptions,
    check: ChangeCheck,
    judge: str | None,
    backend: Backend = "local",
) -> dict[str, Decision]:
    """Promote each trained model that shows no regression (`tasks.promotion.promote_runs`, here
    or in the Modal function `promote`, where the reports are); publish the `promotion` artifact.

    `judge`: the run name of the classifier that judged a DiT-only run, used again if the DiT
    champion must be re-evaluated like for like.
    """
    if backend == "modal":
        found = modal_calls.run_on_modal(
            "promote", deployment=deployment, run_names=json.dumps(run_names),
            report_dir=report_dir, dataset=json.dumps(dataset), options=options.model_dump_json(),
            fingerprint=json.dumps(check.fingerprint), judge=judge or "",
            flow_run_id=flow_run.get_id() or "",
        )  # fmt: skip
    else:
        found = promote_runs(
            deployment, run_names, report_dir, dataset, options, check.fingerprint, judge,
            flow_run.get_id(),
        )  # fmt: skip
    decisions = {kind: Decision.from_dict(d) for kind, d in found.items()}
    for kind, decision in decisions.items():
        get_run_logger().info(
            "%s %s: %s", kind, "promoted" if decision.promoted else "kept as challenger",
            decision.reason,
        )  # fmt: skip
    create_markdown_artifact(
        key="promotion", markdown=_promotion_markdown(deployment, decisions),
        description=f"Champion decisions of {deployment}",
    )  # fmt: skip
    return decisions


def _promotion_markdown(deployment: str, decisions: dict[str, Decision]) -> str:
    parts = [f"## Promotion: `{deployment}`"]
    for kind, d in decisions.items():
        verdict = "**promoted** to champion" if d.promoted else "kept as **challenger**"
        parts.append(f"### {kind}: {verdict}\n\n{d.reason}.")
        if d.deltas:
            rows = "\n".join(
                f"| {name} | {x.previous:.4g} | {x.current:.4g} | {x.delta:+.4g} | "
                f"{'yes' if x.regression else ''} |"
                for name, x in sorted(d.deltas.items())
            )
            parts.append(
                f"Against `{d.compared_with}`:\n\n| metric | champion | new | delta | regression |"
                f"\n|---|---|---|---|---|\n{rows}"
            )
    return "\n\n".join(parts)
