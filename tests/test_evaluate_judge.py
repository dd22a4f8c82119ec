"""A classifier with more classes judges a DiT (issue #19 §4): the `classifier` deployment's
champion (12 breeds and `other`) judging the `dit` deployment's DiT (12 breeds), here in small: a
classifier of two cat breeds and `other` judging a DiT of the two breeds, both really trained (a few
cpu-tiny steps) on two oxford-pets-mini versions published as the two deployments publish them."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import OXFORD_MINI
from PIL import Image

from data.dataset import DatasetSpec
from data.download import ensure
from tasks.evaluate import evaluate
from tasks.evaluation import inception
from tasks.evaluation.measure import ClassifierUnderTest, judged_metrics, split_images
from tasks.evaluation.metrics import classification_metrics
from tasks.evaluation.report import load_report
from tasks.train import TRAINERS, build_config
from tasks.training.export import read_export_config

BREEDS = ["Abyssinian", "Bengal"]
FAST = {"samples_per_class": 4, "steps": 2, "kid_subsets": 5}


@pytest.fixture(scope="module")
def judge_and_dit(shared_datasets, tmp_path_factory):
    """(the DiT's dataset, a 3-class 64 px classifier, a 2-class 32 px DiT, the archive)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("judge")
    archive = root / "images.tar.gz"  # two cat breeds and two dog breeds of the mini archive
    keep = tuple(f"{name}_" for name in [*BREEDS, "beagle", "pug"])
    with tarfile.open(OXFORD_MINI) as source, tarfile.open(archive, "w:gz") as target:
        for member in source:
            if member.isfile() and Path(member.name).name.startswith(keep):
                target.addfile(member, source.extractfile(member))

    def publish(max_other: int, sizes: list[int]):
        spec = DatasetSpec(source=str(archive), labels="breed", max_other=max_other,
                           image_sizes=sizes, val_fraction=0.3)  # fmt: skip
        return ensure(spec, root / "data", workers=1)

    clf_ref, dit_ref = publish(10, [64]), publish(0, [32, 64])
    assert clf_ref.classes == [*BREEDS, "other"] and dit_ref.classes == BREEDS
    runs = {}
    for name, ref, size in (("classifier", clf_ref, 64), ("dit", dit_ref, 32)):
        overrides = {"steps": 4, "warmup_steps": 1, "log_every": 2, "image_size": size,
                     "batch_size": 8}  # fmt: skip
        config = build_config(name, "cpu-tiny", overrides)
        runs[name] = Path(TRAINERS[name].train(config, ref, root / name)["run_dir"])
    return dit_ref, runs["classifier"], runs["dit"], archive


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.DOWNLOAD_ENV, "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_a_judge_with_an_extra_class_judges_the_dit_and_the_report_names_it(
    judge_and_dit, tmp_path, no_inception
):
    ref, classifier, dit, _ = judge_and_dit
    summary = evaluate(ref, classifier, dit, tmp_path / "report", **FAST)
    report = load_report(summary["report_dir"])
    assert report.classifier.path == str(classifier) and report.classifier.classes[-1] == "other"
    markdown = Path(summary["report_md"]).read_text()
    assert f"judged by `{classifier}`" in markdown and f"judged by {classifier}" in markdown
    assert any("classes the dataset lacks (other)" in note for note in report.notes)
    # The judge's own figures, on the DiT's 2-class data: labels mapped to its ids by name, a
    # prediction of `other` wrong, per-class figures for the dataset's classes only.
    clf = ClassifierUnderTest.load(*read_export_config(classifier, "classifier"), torch.device("cpu"))  # fmt: skip
    for key, size in (("classifier.accuracy", 64), ("classifier.accuracy_at_dit_size", 32)):
        images, labels = split_images(ref, size)
        preds, _ = clf.predict(images, 64)
        assert report.metrics[key] == pytest.approx((preds == labels).float().mean().item())
    assert report.confusion_columns == [*BREEDS, "other"]
    assert [sum(row) for row in report.confusion_matrix] == list(
        report.dataset.split_counts.values()
    )
    assert "| | Abyssinian | Bengal | other |" in markdown
    for prefix in ("classifier.class_accuracy", "generator.conditional_accuracy"):
        assert {f"{prefix}.{name}" for name in BREEDS} <= set(report.metrics)
        assert f"{prefix}.other" not in {**report.metrics, **report.not_computed}
    for key in ("generator.conditional_accuracy", "generator.classifier_fd", "generator.precision"):
        assert key in report.metrics
    assert report.sampling.n_generated == 2 * FAST["samples_per_class"]
    # Copy detection, in pixels and in the judge's features, against the DiT's 14 training images.
    assert report.settings["copy_training_images"] == 14 and report.settings["copy_mirrored"] == 1
    for space in ("pixel", "features"):
        assert 0.0 <= report.metrics[f"generator.copy_fraction.{space}"] <= 1.0
        assert 0.0 <= report.settings[f"copy_ratio_min.{space}"] <= 1.0
    out = Path(summary["report_dir"])
    scatter = Image.open(out / report.files["memorisation_scatter"])
    pairs = Image.open(out / report.files["memorisation_pairs"])
    assert scatter.width > scatter.height  # two panels side by side
    assert pairs.height == 8 * (64 + 2) + 2  # 8 (sample | nearest) rows of 32 px shown at 64 px
    assert "## Memorisation (copy detection)" in markdown
    assert "](memorisation_scatter.png)" in markdown and "](memorisation_pairs.png)" in markdown


def test_judged_metrics_count_an_extra_class_as_wrong():
    labels = torch.tensor([0, 0, 1, 1])  # ids into [a, b]
    preds = torch.tensor([0, 2, 1, 0])  # ids into [a, b, other]: one `other`, one b called a
    result = judged_metrics(preds, labels, ["a", "b"], ["a", "b", "other"])
    assert result["accuracy"] == 0.5 and result["per_class_accuracy"] == [0.5, 0.5]
    assert result["confusion_matrix"] == [[1, 0, 1], [1, 1, 0]]
    assert result["macro_f1"] == pytest.approx((2 / 4 + 2 / 3) / 2)  # F1 of a and of b only
    same = judged_metrics(preds.clamp(max=1), labels, ["a", "b"], ["a", "b"])
    assert same == classification_metrics(preds.clamp(max=1), labels, 2)


def test_a_judge_lacking_a_dit_class_is_refused_on_one_line(judge_and_dit, tmp_path):
    ref, classifier, dit, _ = judge_and_dit
    partial = tmp_path / "partial-judge"  # the same export, as if trained without Bengal
    shutil.copytree(classifier, partial)
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "classes": ["Abyssinian", "other"]}))
    with pytest.raises(ValueError, match=r"lacks the DiT's classes \['Bengal'\]") as caught:
        evaluate(ref, partial, dit, tmp_path / "r")
    assert "\n" not in str(caught.value) and str(partial) in str(caught.value)
    assert not (tmp_path / "r").exists()


def test_a_judge_of_a_size_the_dataset_lacks_still_judges(judge_and_dit, tmp_path, no_inception):
    _, classifier, dit, archive = judge_and_dit
    spec = DatasetSpec(source=str(archive), labels="breed", max_other=0, image_sizes=[32],
                       val_fraction=0.3)  # fmt: skip
    ref = ensure(spec, tmp_path / "data", workers=1)  # the DiT's size only: no 64 px cache
    summary = evaluate(ref, classifier, dit, tmp_path / "r", **FAST)
    assert "no 64 px cache" in summary["not_computed"]["classifier.*"]
    assert "classifier.accuracy_at_dit_size" in summary["metrics"]
    assert "generator.conditional_accuracy" in summary["metrics"]


def test_without_a_judge_the_report_says_how_to_get_one(judge_and_dit, tmp_path, no_inception):
    ref, _, dit, _ = judge_and_dit
    summary = evaluate(ref, None, dit, tmp_path / "r", **FAST)
    reason = summary["not_computed"]["generator.conditional_accuracy"]
    assert "`prefect deployment run train-cats/classifier`" in reason
    assert "`train-cats --deployment classifier`" in reason
    assert "train-cats/classifier" in summary["not_computed"]["generator.copy_fraction.features"]
    assert "generator.copy_fraction.pixel" in summary["metrics"]  # pixels need no judge
    assert (
        "train the classifier deployment once"
        in Path(summary["report_md"]).read_text()
    )
