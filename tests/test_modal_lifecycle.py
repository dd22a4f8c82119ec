"""The retraining life cycle on the Modal backend: promotion runs in the Modal function `promote`
and keeps the champions on the runs volume, where the next run's change check and a DiT's judge
find them. Modal is the double of tests/modal_double.py (real function bodies, real tiny trainings;
folders stand in for the volumes)."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

from conftest import OXFORD_MINI
from modal_double import ModalDouble, wire_volumes
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from data.dataset import DatasetSpec
from flows.train_cats import train_cats
from tasks.adapters import lifecycle, limits, modal_app
from tasks.adapters import modal_calls as backend
from tasks.train import build_config


def _artifact(state, key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return next(a.data for a in found if a.key == key)


def test_promote_needs_no_gpu_and_is_bounded_without_retries():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = modal_app.promote.info()
    assert {k: v.name for k, v in info.volumes.items()} == {
        "/data": "train-cats-data", "/runs": "train-cats-runs"}  # fmt: skip
    assert not info.gpus and not info.max_retries
    assert info.timeout == limits.EVALUATION_TIMEOUT_S


def test_modal_runs_promote_on_the_runs_volume_where_checks_and_judges_find_them(
    tmp_path, monkeypatch, http_server
):
    volumes = wire_volumes(tmp_path, monkeypatch)
    double = ModalDouble(volumes["env"])
    monkeypatch.setattr(backend, "lookup", double.resolve)
    monkeypatch.setattr(backend, "read_volume_file", double.read_file)
    monkeypatch.setattr(backend, "list_volume_dir", double.list_dir)
    monkeypatch.setattr(backend, "POLL_S", 0.2)
    http_server.add("/images.tar.gz", OXFORD_MINI)  # a Modal container reads sources by URL
    dataset = {"source": http_server.url("/images.tar.gz"), "labels": "species",
               "image_sizes": [32], "max_other": 40}  # fmt: skip

    def run():
        return train_cats(
            dataset=dataset, models=["classifier"],
            # The small stem: a 2x2 feature map at 32 px, so the champion can teach REPA below.
            classifier={"preset": "cpu-tiny", "overrides": {"small_input_stem": True}},
            compute={"backend": "modal"}, evaluation={"deployment": "nightly"}, return_state=True,
        )  # fmt: skip

    first = run()
    assert first.name == "Promoted", first.message
    assert "no classifier champion yet" in _artifact(first, "change-check")
    record = volumes["runs"] / "champions" / "nightly" / "classifier.json"
    champion = json.loads(record.read_text())
    assert str(volumes["runs"] / champion["run_name"]) == first.result()["run_dirs"]["classifier"]
    first_report = first.result()["report"]["report_dir"]
    assert volumes["runs"] / champion["report"] == Path(first_report)

    second = run()
    assert second.name in ("Promoted", "Challenger"), second.message
    # Its change check read the first run's champion from the volume: nothing changed.
    assert "Changed since the champions:**\n\n- nothing" in _artifact(second, "change-check")
    assert f"Against `{first_report}`" in _artifact(second, "promotion")
    newest = json.loads(record.read_text())["run_name"]
    promoted = second.result()["promoted"]["classifier"]
    assert (newest != champion["run_name"]) == promoted
    # Both promotions ran in the Modal function, on its CPUs (no per-call GPU, no retries).
    assert [c.name for c in double.calls].count("promote") == 2
    assert double.options["promote"] == {}
    commits = [files for op, vol, thread, files in volumes["log"]
               if (op, vol, thread) == ("commit", "runs", "promote")]  # fmt: skip
    assert commits and "champions/nightly/classifier.json" in commits[-1]

    # This process's own runs root is empty: the Modal backend still finds the volume's champion,
    # as the deployment's champion and as the judge of a DiT trained on its classes.
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path / "empty"))
    spec = DatasetSpec(**dataset)
    configs = {"classifier": build_config("classifier", "cpu-tiny").model_dump()}
    check = lifecycle.check_for_changes.fn(spec, configs, ["classifier"], "nightly", False, "modal")
    assert "no classifier champion yet" not in check.changed
    local = lifecycle.check_for_changes.fn(spec, configs, ["classifier"], "nightly", False, "local")
    assert local.changed == ["no classifier champion yet"]
    assert lifecycle.find_judge(["cat"], "modal").run_name == newest
    assert lifecycle.find_judge(["cat"], "local") is None
    assert lifecycle.find_judge(["cat", "tiger"], "modal") is None

    # cpu-small's REPA choice reads the same volume: the champion exists there, it is the only
    # classifier champion (the `dit` deployment's judge: REPA off), a run that trains its own
    # judge with the champion's seed (0) could train it again (off), with seed 1 it may (on).
    small = build_config("dit", "cpu-small", {"repa_teacher": "champion:nightly"})
    choose = partial(lifecycle.choose_repa, small, backend="modal", labels="species")
    assert choose(models=["dit"], judged=False)[0] == {"repa_fallback": "error"}
    assert "the only classifier champion" in choose(models=["dit"], judged=True)[1]
    both = ["classifier", "dit"]
    assert "teacher's seed 0" in choose(models=both, judged=True, classifier_seed=0)[1]
    assert choose(models=both, judged=True, classifier_seed=1)[1] == (
        f"REPA on: block 2 aligns to 'champion:nightly' (run {newest})"
    )
    elsewhere = build_config("dit", "cpu-small")  # champion:classifier: none on the volume
    pinned, line = lifecycle.choose_repa(elsewhere, models=["dit"], backend="modal", judged=False)
    assert pinned["repa_teacher"] is None and "'classifier' has no classifier champion" in line
    # A champion record whose export is gone from the volume cannot teach either.
    (volumes["runs"] / newest / "model.safetensors").unlink()
    assert "no classifier export at /runs/" in choose(models=["dit"], judged=False)[1]
