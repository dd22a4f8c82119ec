"""The retraining life cycle's parts, with real files and a real HTTP server: the source's
revision by conditional request, version ids and downloads that follow it, fingerprints, and
promotion decisions over real report files."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import OXFORD_MINI

from data.dataset import DatasetSpec
from data.download import ensure
from data.errors import HostNotFoundError
from data.revision import source_revision
from tasks.champions import TeacherAsJudgeError, find_judge, read_champion, resolve
from tasks.evaluation.report import DatasetIdentity, ModelIdentity, Report, Sampling
from tasks.fingerprint import changes, code_version, fingerprint
from tasks.promotion import promote


def test_an_unchanged_url_answers_304_and_a_changed_one_a_new_revision(http_server, tmp_path):
    archive = tmp_path / "www" / "images.tar.gz"
    shutil.copy(OXFORD_MINI, archive)
    spec = DatasetSpec(source=http_server.url("/images.tar.gz"))
    first = source_revision(spec)
    assert first.value.startswith("etag:") and first.changed and first.requests == 1
    again = source_revision(spec, first.value)
    assert again == type(first)(first.value, False, 1)
    assert [r.status for r in http_server.requests] == [200, 304]
    assert http_server.count("/images.tar.gz", method="GET") == 0  # no byte of the archive moved
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))  # the upstream file changes
    changed = source_revision(spec, first.value)
    assert changed.changed and changed.value != first.value


def test_a_server_that_refuses_head_is_asked_with_get(http_server, tmp_path):
    shutil.copy(OXFORD_MINI, tmp_path / "www" / "images.tar.gz")
    http_server.fail("/images.tar.gz", 405)
    revision = source_revision(DatasetSpec(source=http_server.url("/images.tar.gz")))
    assert revision.value.startswith("etag:") and revision.requests == 2


def test_a_local_archive_is_identified_by_its_sha256(tmp_path):
    archive = tmp_path / "images.tar.gz"
    shutil.copy(OXFORD_MINI, archive)
    first = source_revision(DatasetSpec(source=str(archive)))
    assert first.value.startswith("sha256:") and first.requests == 0
    assert not source_revision(DatasetSpec(source=str(archive)), first.value).changed
    with open(archive, "ab") as handle:
        handle.write(b"\0")
    assert source_revision(DatasetSpec(source=str(archive)), first.value).changed


def test_an_unknown_host_fails_fast_naming_it():
    started = time.monotonic()
    with pytest.raises(HostNotFoundError, match=r"train-cats-no-such-host\.invalid"):
        source_revision(DatasetSpec(source="http://train-cats-no-such-host.invalid/x.tar.gz"))
    assert time.monotonic() - started < 30


def test_a_new_revision_publishes_a_new_version_from_a_fresh_download(http_server, tmp_path):
    shutil.copy(OXFORD_MINI, tmp_path / "www" / "images.tar.gz")
    base = DatasetSpec(source=http_server.url("/images.tar.gz"), image_sizes=[16], max_other=20)
    assert base.version_id() != base.model_copy(update={"source_revision": "etag:a"}).version_id()
    one = ensure(base.model_copy(update={"source_revision": "etag:a"}), tmp_path / "data")
    assert http_server.count("/images.tar.gz") == 1
    same = ensure(base.model_copy(update={"source_revision": "etag:a"}), tmp_path / "data")
    assert same.version == one.version and http_server.count("/images.tar.gz") == 1
    two = ensure(base.model_copy(update={"source_revision": "etag:b"}), tmp_path / "data")
    # The kept download was of revision a: b is downloaded again, not rebuilt from a's bytes.
    assert two.version != one.version and http_server.count("/images.tar.gz") == 2


def test_fingerprints_name_what_changed(tmp_path):
    spec = DatasetSpec(source="/x/images.tar.gz", source_revision="sha256:aa").model_dump()
    a = fingerprint(spec, {"dit": {"lr": 1e-3, "log_every": 10}})
    assert changes(a, a) == []
    b = fingerprint(
        {**spec, "source_revision": "sha256:bb"}, {"dit": {"lr": 5e-4, "log_every": 99}}
    )
    assert changes(b, a) == [
        "dataset.source_revision: 'sha256:aa' -> 'sha256:bb'",
        "dit.lr: 0.001 -> 0.0005",  # log_every is observational: not a change
    ]
    assert changes(a, None) == ["no champion yet"]
    for folder in ("data", "models", "tasks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text("x = 1\n")
    before = code_version(tmp_path)
    (tmp_path / "models" / "m.py").write_text("x = 2\n")
    assert code_version(tmp_path) != before


def _report(root: Path, name: str, metrics: dict, judge: str = "j1", samples: int = 4) -> Path:
    identity = {"kind": "classifier", "path": "c", "weights_sha256": judge, "config_sha256": "c",
                "image_size": 32, "classes": ["a", "b"]}  # fmt: skip
    report = Report(
        created_at=datetime.now(timezone.utc).isoformat(),
        deployment="all",
        dataset=DatasetIdentity(
            version="v1",
            root="/d",
            label_mode="breed",
            classes=["a", "b"],
            split_counts={"a": 5, "b": 5},
        ),
        classifier=ModelIdentity(**identity),
        dit=ModelIdentity(**{**identity, "kind": "dit", "weights_sha256": name}),
        sampling=Sampling(
            method="heun",
            steps=8,
            cfg_scale=2.0,
            seed=0,
            samples_per_class=samples,
            n_generated=2 * samples,
            image_size=32,
        ),
        metrics=metrics,
        thresholds={"abs": 0.02, "rel": 0.1},
    )
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(report.model_dump_json())
    return folder


def test_promotion_keeps_the_better_model_and_rejudges_unlike_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    fp = {"dataset": {}, "code": "c", "configs": {}}
    never = lambda champion: pytest.fail("rejudged a like-for-like champion")  # noqa: E731
    first = _report(tmp_path, "r1", {"generator.classifier_fd": 1.0, "classifier.accuracy": 0.8})
    decision = promote("all", "dit", "run1/dit", first, fp, never)
    assert decision.promoted and read_champion("all", "dit").run_name == "run1/dit"
    assert resolve("champion:all", "dit") == tmp_path / "run1" / "dit"
    # Worse FD (+30 % > the 10 % threshold): a challenger; the champion stays.
    worse = _report(tmp_path, "r2", {"generator.classifier_fd": 1.3})
    decision = promote("all", "dit", "run2/dit", worse, fp, never)
    assert not decision.promoted and "generator.classifier_fd" in decision.reason
    assert decision.deltas["generator.classifier_fd"].regression
    assert read_champion("all", "dit").run_name == "run1/dit"
    # Another judge: the champion is evaluated again under the new conditions and compared.
    rejudged = []

    def rejudge(champion):
        rejudged.append(champion.run_name)
        return _report(tmp_path, "r1-again", {"generator.classifier_fd": 2.0}, judge="j2")

    better = _report(tmp_path, "r3", {"generator.classifier_fd": 1.9}, judge="j2")
    decision = promote("all", "dit", "run3/dit", better, fp, rejudge)
    assert rejudged == ["run1/dit"] and decision.rejudged and decision.promoted
    assert "another judge" in decision.reason
    assert read_champion("all", "dit").run_name == "run3/dit"
    # A DiT report without judged metrics cannot beat anything: it says how to get a judge.
    blind = _report(tmp_path, "r4", {}, judge="j2")
    decision = promote("all", "dit", "run4/dit", blind, fp, never)
    assert not decision.promoted and "train-cats/classifier" in decision.reason

    # A new judge that is the champion's REPA teacher (a classifier retrained bit for bit)
    # cannot re-evaluate it fairly: nothing is compared, and the champion stays.
    def refuse(champion):
        raise TeacherAsJudgeError("the classifier c is the REPA teacher of the DiT run3/dit")

    teacher_judged = _report(tmp_path, "r5", {"generator.classifier_fd": 0.5}, judge="j3")
    decision = promote("all", "dit", "run5/dit", teacher_judged, fp, refuse)
    assert not decision.promoted and decision.reason.startswith("not compared, the champion stays")
    assert "REPA teacher" in decision.reason and not decision.deltas
    assert read_champion("all", "dit").run_name == "run3/dit"


def test_the_judge_is_a_classifier_champion_whose_classes_cover_the_dits(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    assert find_judge(["a"]) is None
    report = _report(tmp_path, "r1", {"classifier.accuracy": 0.8})
    promote("classifier", "classifier", "run1/classifier", report, {}, lambda c: report)
    assert find_judge(["a"]).run_name == "run1/classifier"
    assert find_judge(["a", "z"]) is None  # it has never seen z
    with pytest.raises(FileNotFoundError, match="no dit champion yet"):
        resolve("champion:nightly", "dit")


def test_a_repa_teachers_weights_are_part_of_the_dits_fingerprint(tmp_path, monkeypatch):
    """`repa_teacher` names a folder or a champion, names that outlive the weights behind them:
    a new classifier champion, or an export overwritten in place, changes what the DiT is aligned
    to, so the change check must see it even though the config's text is the same."""
    from tasks.adapters.lifecycle import check_for_changes

    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    spec = DatasetSpec(source="/x/images.tar.gz")
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"first weights")

    def check(teacher: str) -> dict:
        config = {"lr": 1e-3, "repa_teacher": teacher}
        return check_for_changes.fn(spec, {"dit": config}, ["dit"], "d", probe=False).fingerprint

    by_folder = check(str(folder))
    assert check(str(folder)) == by_folder  # the same bytes: the same fingerprint
    (folder / "model.safetensors").write_bytes(b"retrained weights")
    assert changes(check(str(folder)), by_folder) == [
        "dit.repa_teacher_identity: 'sha256:"
        + hashlib.sha256(b"first weights").hexdigest()
        + "' -> 'sha256:"
        + hashlib.sha256(b"retrained weights").hexdigest()
        + "'"
    ]
    gone = check(str(tmp_path / "gone"))["configs"]["dit"]
    assert "not readable" in gone["repa_teacher_identity"]

    assert check("champion:all")["configs"]["dit"]["repa_teacher_identity"] == (
        "no classifier champion yet"
    )
    reports = tmp_path / "reports"
    for run in ("run1", "run2"):
        report = _report(reports, run, {"classifier.accuracy": 0.8 if run == "run1" else 0.9})
        promote("all", "classifier", f"{run}/classifier", report, {}, lambda c, r=report: r)
        identity = check("champion:all")["configs"]["dit"]["repa_teacher_identity"]
        assert identity == f"run {run}/classifier"


def test_a_dits_judge_is_never_its_repa_teacher(tmp_path, monkeypatch):
    """A `dit` deployment aligned to the `classifier` deployment's champion is judged by another
    classifier champion, or by none: never by the features it was trained towards."""
    from tasks.adapters.lifecycle import find_judge as flow_find_judge

    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    for deployment, accuracy in (("older", 0.8), ("classifier", 0.9)):  # "classifier" is newer
        report = _report(tmp_path / "reports", deployment, {"classifier.accuracy": accuracy})
        promote(deployment, "classifier", f"{deployment}/run", report, {}, lambda c, r=report: r)
        time.sleep(1.1)  # promoted_at has whole seconds: "classifier" must be strictly newer
    assert flow_find_judge(["a"], "local").run_name == "classifier/run"  # the newest
    for teacher in ("champion:classifier", str(tmp_path / "classifier" / "run")):
        assert flow_find_judge(["a"], "local", teacher).run_name == "older/run", teacher
    assert flow_find_judge(["a"], "local", "champion:elsewhere").run_name == "classifier/run"
