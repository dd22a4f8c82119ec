"""Evaluation end to end on real exports: a tiny real training on oxford-pets-mini (species), then
`tasks.evaluate` in-process, in a fresh subprocess, with and without Inception weights, twice for
deltas, and inside a real Prefect flow run for the artifacts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import OXFORD_MINI
from PIL import Image

from data.dataset import DatasetSpec
from data.download import ensure
from tasks.adapters.artifacts import publish_report
from tasks.evaluate import evaluate
from tasks.evaluation import inception
from tasks.evaluation.history import append_history
from tasks.evaluation.measure import (
    ClassifierUnderTest,
    classifier_metrics,
    generator_metrics,
    split_images,
)
from tasks.evaluation.report import Report, compare, load_report
from tasks.promotion import unlike
from tasks.train import TRAINERS, build_config
from tasks.training.export import read_export_config
from tasks.training.runtime import resolve_precision

REPO = Path(__file__).resolve().parents[1]
INCEPTION_KEYS = ("generator.inception_fid", "generator.inception_kid")
FAST = {"samples_per_class": 5, "steps": 3, "kid_subsets": 10}


@pytest.fixture(scope="module")
def exports(oxford_mini_species_ref, tmp_path_factory):
    """Real cpu-tiny trainings, cut to a few steps: a 64 px classifier and a 32 px DiT (the
    classifier larger, as in the cpu-small presets), so that samples go through the resize to
    the classifier's size."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("exports")
    runs = {}
    for name, size in (("classifier", 64), ("dit", 32)):
        overrides = {"steps": 4, "warmup_steps": 1, "log_every": 2, "image_size": size}
        config = build_config(name, "cpu-tiny", overrides)
        runs[name] = TRAINERS[name].train(config, oxford_mini_species_ref, root / name)["run_dir"]
    return oxford_mini_species_ref, Path(runs["classifier"]), Path(runs["dit"])


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """No Inception weights anywhere and downloads forbidden."""
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.DOWNLOAD_ENV, "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A weights file with the FID Inception's exact layout but random values, so that the real
    Inception code path runs offline (the numbers it gives mean nothing)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with (
        mock.patch("torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused")
    torch.save(network.state_dict(), path)
    return path


def test_evaluate_from_exported_files_alone_in_a_fresh_process(exports, tmp_path):
    ref, classifier, dit = exports
    out = tmp_path / "report"
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch-home"),
        inception.DOWNLOAD_ENV: "1",  # the CLI flag must win
        "OMP_NUM_THREADS": "2",
    }
    env.pop(inception.WEIGHTS_ENV, None)
    # The subprocess timeout is the hang guard; speed targets live in benchmarks/.
    run = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate", "--dataset", ref.root, "--classifier",
         str(classifier), "--dit", str(dit), "--out", str(out), "--samples-per-class", "5",
         "--steps", "3", "--sampler", "heun", "--cfg-scale", "1.5", "--no-inception-download",
         "--kid-subsets", "10"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["report_dir"] == str(out.resolve())
    report = load_report(out)
    assert report.dataset.version == ref.version
    assert (
        report.classifier.weights_sha256
        == hashlib.sha256((classifier / "model.safetensors").read_bytes()).hexdigest()
    )
    assert report.dit.dataset_version == ref.version
    assert (report.sampling.method, report.sampling.steps, report.sampling.cfg_scale) == (
        "heun",
        3,
        1.5,
    )
    assert report.sampling.n_generated == 10
    # The precision the samples were drawn in ("auto" resolves per machine), and two reports
    # drawn in different ones are not compared as like for like.
    drawn_in = resolve_precision(torch.device("cpu"), "auto")
    assert (
        report.sampling.precision == drawn_in and f", {drawn_in}" in (out / "report.md").read_text()
    )
    assert unlike(report, report, "dit") == []
    other = report.model_copy(deep=True)
    other.sampling.precision = "fp32" if drawn_in == "bf16" else "bf16"
    assert unlike(other, report, "dit") == ["other sample counts or sampler"]
    for name in ("classifier.accuracy", "classifier.macro_f1", "generator.conditional_accuracy",
                 "generator.precision", "generator.recall"):  # fmt: skip
        assert 0.0 <= report.metrics[name] <= 1.0
    assert report.metrics["generator.classifier_fd"] >= 0.0
    assert math.isfinite(report.metrics["generator.classifier_kid"])
    assert report.settings["kid_subset_size"] == report.settings["n_feature_samples"] == 10
    assert any("feature dimensions" in note for note in report.notes)  # 10 samples < 512 dims
    assert any("resized to the classifier's 64 px" in note for note in report.notes)
    # The reference for the conditional accuracy: real held-out images at the DiT's 32 px.
    images, labels = split_images(ref, 32)
    clf = ClassifierUnderTest.load(
        *read_export_config(classifier, "classifier"), torch.device("cpu")
    )
    at_32 = classifier_metrics(clf, images, labels)
    assert report.metrics["classifier.accuracy_at_dit_size"] == pytest.approx(at_32["accuracy"])
    for name, acc in zip(clf.classes, at_32["per_class_accuracy"], strict=True):
        assert report.metrics[f"classifier.class_accuracy_at_dit_size.{name}"] == pytest.approx(acc)
    assert sum(map(sum, report.confusion_matrix)) == sum(report.dataset.split_counts.values())
    for key in INCEPTION_KEYS:
        assert "--no-inception-download" in report.not_computed[key]
        assert key not in report.metrics
    # Pictures: one labelled row per class in the grid, five PNGs per class, all 32 px.
    grid = Image.open(out / report.files["grid"]).convert("L")
    assert grid.height == 2 * (64 + 2) + 2  # two rows of 32 px samples shown at 64 px, padding 2
    margin = grid.width - (5 * (64 + 2) + 2)
    for row in range(2):  # each row's label is drawn in the left margin
        box = grid.crop((0, 2 + row * 66, margin, 2 + row * 66 + 64))
        assert box.getextrema()[0] < 128
    for name in ref.classes:
        files = sorted((out / "samples" / name).glob("*.png"))
        assert len(files) == 5 and Image.open(files[0]).size == (32, 32)
    markdown = (out / "report.md").read_text()
    assert "](samples_grid.png)" in markdown and "](confusion_matrix.png)" in markdown
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # staging renamed away


def test_conditional_accuracy_on_real_images_equals_classifier_accuracy(exports):
    ref, classifier, _ = exports
    clf = ClassifierUnderTest.load(
        *read_export_config(classifier, "classifier"), torch.device("cpu")
    )
    images, labels = split_images(ref, clf.image_size)
    accuracy = classifier_metrics(clf, images, labels)["accuracy"]
    values, skipped, settings = generator_metrics(clf, images, labels, images, kid_subsets=5)
    assert values["generator.conditional_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # Per conditioning class it is the classifier's recall of that class.
    per_class = classifier_metrics(clf, images, labels)["per_class_accuracy"]
    for name, recall in zip(clf.classes, per_class, strict=True):
        assert values[f"generator.conditional_accuracy.{name}"] == pytest.approx(recall, abs=1e-9)
    # The same images as "generated" and real: the distribution metrics see no difference.
    assert values["generator.classifier_fd"] == pytest.approx(0.0, abs=1e-3)
    assert values["generator.precision"] == values["generator.recall"] == 1.0
    assert not skipped and settings["n_feature_samples"] == len(labels)
    # Real partners drawn for only half of the samples, in another order (as evaluate() does):
    # the distribution metrics compare each real image with its partner, while the conditional
    # accuracy still counts every sample.
    partners = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    partners = partners[: len(images) // 2]
    paired, _, settings = generator_metrics(clf, images, labels, images[partners], partners)
    assert paired["generator.conditional_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert paired["generator.classifier_fd"] == pytest.approx(0.0, abs=1e-3)
    assert settings["n_feature_samples"] == len(partners)


def test_missing_inception_weights_are_not_computed_with_the_reason(
    exports, tmp_path, no_inception
):
    ref, classifier, dit = exports
    missing = tmp_path / "nowhere" / "inception.pth"
    summary = evaluate(ref, classifier, dit, tmp_path / "r", inception_weights=missing, **FAST)
    for key in INCEPTION_KEYS:
        assert str(missing) in summary["not_computed"][key]
        assert "does not exist" in summary["not_computed"][key]
        assert key not in summary["metrics"]


def test_inception_fid_and_kid_are_computed_from_a_local_weights_file(
    exports, tmp_path, no_inception, random_inception_weights
):
    ref, _, dit = exports  # no classifier: Inception metrics do not need one
    summary = evaluate(ref, None, dit, tmp_path / "r", inception_weights=random_inception_weights, **FAST)  # fmt: skip
    assert summary["metrics"]["generator.inception_fid"] >= 0.0
    assert math.isfinite(summary["metrics"]["generator.inception_kid"])
    assert "no classifier" in summary["not_computed"]["generator.classifier_fd"]
    report = load_report(summary["report_dir"])
    assert report.settings["inception_kid_subset_size"] == 10
    assert any("Inception feature space: 10 samples" in note for note in report.notes)


def test_report_round_trips_through_json_and_shows_deltas_and_regressions(
    exports, tmp_path, no_inception
):
    ref, classifier, dit = exports
    first = evaluate(ref, classifier, dit, deployment="nightly", **FAST)
    second = evaluate(ref, classifier, dit, deployment="nightly", **FAST)
    assert Path(first["report_dir"]).parent == Path(second["report_dir"]).parent
    report = load_report(second["report_dir"])
    assert Report.model_validate_json(report.model_dump_json()) == report
    assert Report.model_validate(json.loads(json.dumps(report.model_dump()))) == report
    # Same exports and seed: every delta is zero and nothing regressed.
    assert report.previous_report == first["report_json"]
    assert set(report.deltas) >= {"classifier.accuracy", "generator.classifier_fd"}
    assert all(d.delta == pytest.approx(0.0, abs=1e-9) for d in report.deltas.values())
    assert report.regressions == []
    # A previous report with better numbers makes this one a regression, beyond the thresholds.
    better = report.model_copy(deep=True)
    better.metrics["classifier.accuracy"] += 0.05
    better.metrics["classifier.macro_f1"] += 0.01  # within the 0.02 tolerance
    better.metrics["generator.classifier_fd"] /= 2
    deltas, regressions, notes = compare(report, better, abs_threshold=0.02, rel_threshold=0.10)
    assert set(regressions) == {"classifier.accuracy", "generator.classifier_fd"}
    assert notes == []
    # Another judge (here: other classifier weights) makes the generator deltas not comparable.
    rejudged = better.model_copy(deep=True)
    rejudged.classifier.weights_sha256 = "0" * 64
    _, _, notes = compare(report, rejudged, abs_threshold=0.02, rel_threshold=0.10)
    assert any("judged the DiT with another classifier" in note for note in notes), notes
    # Another recipe (here: the DiT's preset changed its lr and steps) is noted field by field.
    retrained = better.model_copy(deep=True)
    retrained.dit.train_config = {**report.dit.train_config, "lr": 1.0, "steps": 7, "log_every": 3}
    _, _, notes = compare(report, retrained, abs_threshold=0.02, rel_threshold=0.10)
    (note,) = [n for n in notes if "another config" in n]
    assert note.startswith("the previous report's dit was trained with another config (lr 1.0")
    assert "steps 7 ->" in note and "log_every" not in note
    assert deltas["classifier.accuracy"].delta == pytest.approx(-0.05)
    previous = tmp_path / "better.json"
    previous.write_text(better.model_dump_json())
    third = evaluate(
        ref, classifier, None, tmp_path / "third", previous=previous, deployment="nightly"
    )
    assert third["regressions"] == ["classifier.accuracy"]
    assert "**regression**" in Path(third["report_md"]).read_text()
    # The same deployment run on other data (here: other classes) is newer in the history but
    # not comparable, so the next report is compared with the last comparable one.
    other = Path(second["report_dir"]).with_name("other-data")
    shutil.copytree(second["report_dir"], other)
    doctored = load_report(other)
    doctored.dataset.classes = ["Bengal", "Sphynx", "other"]
    (other / "report.json").write_text(doctored.model_dump_json())
    append_history("nightly", other, doctored.created_at)
    fourth = evaluate(ref, classifier, None, deployment="nightly", **FAST)
    assert load_report(fourth["report_dir"]).previous_report == third["report_json"]


def test_bad_input_is_rejected_before_any_work(exports, tmp_path):
    ref, classifier, dit = exports
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(ref, out=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        evaluate(ref, classifier=tmp_path, out=tmp_path / "b")
    with pytest.raises(ValueError, match="holds a 'dit' export, expected 'classifier'"):
        evaluate(ref, classifier=dit, out=tmp_path / "c")
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluate(ref, dit=dit, out=tmp_path / "d", sampler="rk45")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate(ref, classifier=classifier, out=tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # nothing half-written


def test_prefect_flow_run_gets_table_markdown_and_link_artifacts(exports, tmp_path, no_inception):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ref, classifier, dit = exports

    @flow
    def evaluation_flow() -> tuple[str, dict]:
        from prefect.runtime import flow_run

        summary = evaluate(ref, classifier, dit, tmp_path / "r", deployment="ui", **FAST)
        publish_report(Path(summary["report_dir"]))  # what the Prefect task adds to evaluate()
        return flow_run.id, summary

    run_id, summary = evaluation_flow()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    table = by_key["ui-eval-metrics"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["metric"] for r in rows} >= set(summary["metrics"])
    markdown = by_key["ui-eval-report"]
    assert markdown.type == "markdown"
    assert markdown.data.count("data:image/png;base64,") == 4  # grid, confusion, memorisation x2
    # Prefect stores a link artifact as markdown "[text](link)".
    for key, path in (("ui-eval-report-json", "report_json"), ("ui-eval-report-md", "report_md")):
        assert f"]({Path(summary[path]).as_uri()})" in by_key[key].data
    assert (
        f"]({(Path(summary['report_dir']) / 'samples_grid.png').as_uri()})"
        in by_key["ui-eval-grid"].data
    )


def test_command_line_bad_input_is_one_line_and_status_2(tmp_path):
    missing = tmp_path / "no-such-version"
    run = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate", "--dataset", str(missing), "--dit", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"dataset '{missing}' does not exist" in run.stderr.strip().splitlines()[-1]


def test_command_line_help_lists_the_options():
    run = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0
    for option in ("--dataset", "--classifier", "--dit", "--out", "--samples-per-class",
                   "--sampler", "--steps", "--cfg-scale", "--inception-weights", "--previous"):  # fmt: skip
        assert option in run.stdout


def test_overwrite_replaces_a_report_whole_and_never_compares_it_with_itself(exports, tmp_path):
    ref, classifier, _ = exports
    out = tmp_path / "report"
    first = evaluate(ref, classifier, out=out, deployment="rerun")
    (out / "stale.txt").write_text("from an older run")
    second = evaluate(ref, classifier, out=out, deployment="rerun", overwrite=True)
    assert second["report_dir"] == first["report_dir"]
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging or old copies
    assert load_report(out).previous_report is None  # its own earlier version is not "previous"


def test_a_model_trained_on_another_dataset_version_is_flagged(exports, tmp_path, no_inception):
    """Splits are per version: another version's held-out images may be this classifier's
    training images, so the report must say its figures can be inflated."""
    ref, classifier, _ = exports
    same = load_report(evaluate(ref, classifier, out=tmp_path / "same")["report_dir"])
    assert not any("was trained on dataset" in note for note in same.notes)
    other_spec = DatasetSpec(
        source=str(OXFORD_MINI), labels="species", image_sizes=[64], val_fraction=0.3
    )
    other = ensure(other_spec, tmp_path / "data", workers=1)
    assert other.version != ref.version
    flagged = load_report(evaluate(other, classifier, out=tmp_path / "other")["report_dir"])
    assert any(
        f"classifier was trained on dataset {ref.version}, not on the evaluated {other.version}"
        in note
        for note in flagged.notes
    ), flagged.notes
