"""Promote a new model to its deployment's champion only when it is no worse, like for like.

`promote(...)` compares the new run's evaluation report with the champion's on the metrics of the
model's kind (`classifier.*` for the classifier, `generator.*` for the DiT), with the report's
regression thresholds (`EvalOptions.regression_abs` / `regression_rel`). The comparison must be
like for like: the same dataset version and classes, the same judge (the classifier whose features
and predictions score a DiT) and the same sample counts. When the champion's own report differs in
any of these, the champion is evaluated again under the new run's conditions (`rejudge`) and
compared with that. No regression: the new run becomes the champion (`tasks.champions`, an atomic
pointer). Otherwise it stays a challenger, and the champion is untouched.

`promote_runs(...)` does so for every model of one flow run, re-evaluating a champion with
`tasks.evaluate.evaluate` when needed: the one entry point of the Prefect task (local backend) and
of the Modal function `promote` (runs volume).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.champions import Champion, Kind, TeacherAsJudgeError, read_champion, write_champion
from tasks.evaluation.options import EvalOptions
from tasks.evaluation.report import Delta, Report, compare, judge_identity, load_report
from tasks.paths import run_path, runs_root

METRIC_PREFIX = {"classifier": "classifier.", "dit": "generator."}


@dataclass
class Decision:
    """What `promote` decided for one model kind, and why."""

    kind: str
    promoted: bool
    reason: str
    deltas: dict[str, Delta] = field(default_factory=dict)
    compared_with: str | None = None  # the champion report the deltas are against
    rejudged: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (what the Modal function returns)."""
        return {**asdict(self), "deltas": {k: d.model_dump() for k, d in self.deltas.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        deltas = {k: Delta.model_validate(d) for k, d in data.get("deltas", {}).items()}
        return cls(**{**data, "deltas": deltas})


def unlike(current: Report, previous: Report, kind: str) -> list[str]:
    """Why two reports are not like-for-like for `kind`; [] when they are."""
    reasons = []
    if current.dataset.version != previous.dataset.version:
        reasons.append(f"dataset {previous.dataset.version} -> {current.dataset.version}")
    if current.dataset.classes != previous.dataset.classes:
        reasons.append("other dataset classes")
    if kind == "dit":
        if judge_identity(current) != judge_identity(previous):
            reasons.append("another judge")
        if _sampling(current) != _sampling(previous):
            reasons.append("other sample counts or sampler")
    return reasons


def _sampling(report: Report) -> tuple[dict | None, Any]:
    drawn = report.sampling.model_dump(exclude={"seed"}) if report.sampling else None
    return drawn, report.settings.get("n_feature_samples")


def promote(
    deployment: str,
    kind: Kind,
    run_name: str,
    report_dir: Path,
    fingerprint: dict[str, Any],
    rejudge: Callable[[Champion], Path],
    flow_run_id: str | None = None,
) -> Decision:
    """Make `run_name` (relative to the runs root) `deployment`'s `kind` champion if its report
    (`report_dir`) shows no regression against the champion's, like for like.

    `rejudge(champion)` evaluates the champion's export under the new report's conditions and
    returns that report's folder; it is called only when the champion's own report is not
    like-for-like (or is gone).
    """
    report = load_report(report_dir)
    champion = read_champion(deployment, kind)
    decision = Decision(kind, promoted=True, reason="the deployment's first champion")
    if champion is not None:
        baseline_dir = champion.report_dir
        reasons = ["its report is gone"] if not (baseline_dir / "report.json").is_file() else []
        baseline = None if reasons else load_report(baseline_dir)
        reasons = reasons or unlike(report, baseline, kind)
        if reasons:
            try:
                baseline_dir = rejudge(champion)
            except TeacherAsJudgeError as exc:  # the champion was aligned to this judge
                return Decision(kind, promoted=False, reason=_unjudgeable(reasons, exc))
            baseline = load_report(baseline_dir)
        assert baseline is not None
        thresholds = report.thresholds or {"abs": 0.02, "rel": 0.10}
        deltas, regressions, _ = compare(report, baseline, thresholds["abs"], thresholds["rel"])
        prefix = METRIC_PREFIX[kind]
        deltas = {k: d for k, d in deltas.items() if k.startswith(prefix)}
        worse = sorted(k for k in regressions if k.startswith(prefix))
        decision = Decision(
            kind,
            promoted=not worse and bool(deltas),
            reason=(
                f"regressed on {', '.join(worse)}" if worse
                else f"no {prefix}* metric in both reports to compare (a DiT needs a judge: run "
                "`prefect deployment run train-cats/classifier` once)" if not deltas
                else "no regression against the champion"
            ) + (f" (champion re-evaluated: {'; '.join(reasons)})" if reasons else ""),
            deltas=deltas,
            compared_with=str(baseline_dir),
            rejudged=bool(reasons),
        )  # fmt: skip
    if decision.promoted:
        write_champion(
            Champion(
                deployment=deployment,
                kind=kind,
                run_name=run_name,
                report=str(Path(report_dir).resolve().relative_to(runs_root())),
                classes=report.dataset.classes,
                dataset_version=report.dataset.version,
                fingerprint=fingerprint,
                metrics={
                    k: v for k, v in report.metrics.items() if k.startswith(METRIC_PREFIX[kind])
                },
                promoted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                flow_run_id=flow_run_id,
            )
        )
    return decision


def _unjudgeable(reasons: list[str], exc: Exception) -> str:
    """Why a champion that cannot be re-evaluated like for like stays: its REPA teacher is the
    new run's judge (on the same data and seed a retrained classifier can be that teacher bit
    for bit), so no comparison is fair; the champion is kept rather than replaced unseen."""
    return (
        f"not compared, the champion stays: re-evaluating it ({'; '.join(reasons)}) needs this "
        f"run's judge, its REPA teacher ({exc})"
    )


def promote_runs(
    deployment: str,
    run_names: dict[str, str],
    report_dir: str | Path,
    dataset: dict,
    options: EvalOptions,
    fingerprint: dict[str, Any],
    judge: str | None = None,
    flow_run_id: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`promote` each model of one flow run (`run_names`: kind -> run name, evaluated together
    into `report_dir` on `dataset` with `options`); returns each `Decision.to_dict()` by kind.

    `judge`: the run name of the classifier champion that judged a DiT trained alone, used again
    if the DiT champion must be re-evaluated like for like.
    """
    decisions = {}
    for kind, run_name in sorted(run_names.items()):

        def rejudge(champion: Champion, kind: str = kind) -> Path:
            from tasks.evaluate import evaluate  # torch: only when a champion is re-evaluated

            out = run_path(
                f"{Path(report_dir).name}-champion-{kind}-{champion.run_name}".replace("/", "-")
            )
            judged_by = run_names.get("classifier") or judge
            classifier = run_path(judged_by) if judged_by else None
            if kind == "classifier":
                classifier = champion.run_dir
            dit = champion.run_dir if kind == "dit" else None
            # Its own history key: a re-evaluation must never become the next run's "previous".
            again = options.model_copy(
                update={"deployment": f"{deployment}-rejudged", "overwrite": True, "previous": None}
            )
            report = evaluate(dataset, classifier=classifier, dit=dit, out=out, options=again)
            return Path(report["report_dir"])

        decision = promote(
            deployment, kind, run_name, Path(report_dir), fingerprint, rejudge, flow_run_id
        )  # type: ignore[arg-type]
        decisions[kind] = decision.to_dict()
    return decisions
