"""First contact (issue #22): every command line answers --help and early errors in about a second,
without importing torch or Prefect; known data errors end on one line, in the words of the entry
point (flags for a command line, parameter paths for a deployment run); --verbose adds the
traceback; a run that fails Prefect's own parameter validation leaves its failure artifact.

The command lines run as real subprocesses, exactly as a user types them, against real files and
a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

import pytest
import torch
from archive_factory import oxford_members, write_tar
from conftest import OXFORD_MINI, REPO
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.parameters import FlowParameters
from flows.train_cats import train_cats
from models import classifier as classifier_model
from models.dit import DIT_CONFIGS, dit_from_config
from models.flow_matching import SAMPLERS
from tasks.configs.classifier import BACKBONES
from tasks.configs.dit import ARCH_FIELDS, ARCHS, PRESETS, DiTConfig
from tasks.evaluation import options

HEAVY = ("torch", "prefect")
# Seconds: an order of magnitude below the 6-12 s that importing torch and Prefect took, loose
# enough for a loaded 2-core machine (the fastest of two tries counts).
STARTUP_S = 3.0
FLOW = ["-m", "flows.train_cats"]
FLOW_CLI = ["-m", "flows.cli"]  # what `train-cats` runs
DOWNLOAD = ["data/download.py"]
TRAIN_DIT = ["-m", "tasks.train_dit"]
TRAIN_CLASSIFIER = ["-m", "tasks.train_classifier"]
EVALUATE = ["-m", "tasks.evaluate"]


@dataclass
class Ran:
    status: int
    stdout: str
    stderr: list[str]  # its lines, less those of -X importtime
    imported: set[str]  # top-level packages imported
    seconds: float


def _run(args: list[str], timeout: float = 120) -> Ran:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    seconds = time.monotonic() - started
    lines = done.stderr.splitlines()
    timed = [line for line in lines if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timed[1:]}
    rest = [line for line in lines if not line.startswith("import time:")]
    return Ran(done.returncode, done.stdout, rest, imported, seconds)


def _fast(args: list[str]) -> Ran:
    """Run twice: neither imports torch or Prefect, and the faster takes under STARTUP_S."""
    first, second = _run(args), _run(args)
    for ran in (first, second):
        assert not ran.imported & set(HEAVY), (args, ran.imported & set(HEAVY))
    assert min(first.seconds, second.seconds) < STARTUP_S, (args, first.seconds, second.seconds)
    return first


@pytest.mark.parametrize("cli", [FLOW, FLOW_CLI, DOWNLOAD, TRAIN_DIT, TRAIN_CLASSIFIER, EVALUATE])
def test_help_is_fast_and_imports_neither_torch_nor_prefect(cli):
    ran = _fast([*cli, "--help"])
    assert ran.status == 0 and "--verbose" in ran.stdout


@pytest.mark.parametrize("cli", [FLOW, DOWNLOAD, TRAIN_DIT, EVALUATE])
def test_an_unknown_flag_is_one_line_pointing_at_help(cli):
    ran = _fast([*cli, "--no-such-flag"])
    assert ran.status == 2
    (line,) = ran.stderr
    assert "unrecognized arguments: --no-such-flag" in line or "required" in line, line
    assert line.endswith("--help)"), line


@pytest.mark.parametrize(
    ("cli", "status", "expected"),
    [
        ([*FLOW_CLI, "--source", "/nonexistent/images.tar.gz"], 2, "--source '/nonexistent"),
        ([*FLOW, "--source", "/nonexistent/images.tar.gz"], 2, "--source '/nonexistent"),
        ([*FLOW_CLI, "--source", "http://train-cats-no-such-host.invalid/x.tgz"], 2, "--source"),
        ([*FLOW_CLI, "--checksum", "md5:xyz"], 2, "--checksum: checksum 'md5:xyz' is not ALGO:HEX"),
        ([*FLOW_CLI, "--params", '{"dit": {"overrides": {"patch_size": 5}}}'], 2,
         "patch_size=5 must divide image_size=32"),
        ([*FLOW_CLI, "--params", '{"dit": {"overrides": {"repa_teacher": "/nonexistent/t"}}}'],
         2, "dit.repa_teacher '/nonexistent/t': no classifier export at /nonexistent/t"),
        # A teacher the user names is required (cpu-small's own falls back: test_repa_choice.py).
        ([*FLOW_CLI, "--params", '{"dit": {"overrides": {"repa_teacher": "champion:nope"}}}'],
         2, "deployment 'nope' has no classifier champion yet"),
        ([*TRAIN_DIT, "--dataset", "/nonexistent", "--run-dir", "r"], 2, "'/nonexistent' does not"),
        ([*TRAIN_DIT, "--dataset", "/x", "--run-dir", "r", "--patch-size", "5"], 2,
         "error: patch_size=5 must divide image_size=32"),
        ([*TRAIN_CLASSIFIER, "--dataset", "/x", "--run-dir", "r", "--backbone", "vgg"], 2,
         "error: backbone: unknown backbone 'vgg'"),
        ([*TRAIN_CLASSIFIER, "--dataset", "/x", "--run-dir", "r", "--pretrained",
          "--backbone", "resnet8"], 2, "has no published ImageNet weights"),
        ([*EVALUATE, "--dataset", "/nonexistent", "--dit", "d"], 2, "'/nonexistent' does not"),
        ([*EVALUATE, "--dataset", "/x", "--dit", "d", "--kid-subsets", "0"], 2, "kid_subsets:"),
        ([*DOWNLOAD, "--source", "/nonexistent/images.tar.gz"], 1, "--source '/nonexistent"),
    ],
)  # fmt: skip
def test_early_errors_are_fast_one_line_and_in_flags(cli, status, expected):
    ran = _fast(cli)
    assert ran.status == status
    (line,) = [line for line in ran.stderr if "error" in line.lower()]
    assert expected in line and "Traceback" not in "\n".join(ran.stderr)
    assert "dataset.source" not in line and "dataset.checksum" not in line
    if cli[0] != "data/download.py":  # whose INFO log lines come before its error line
        assert ran.stderr == [line]


def test_a_bad_flag_is_fast():
    required = ["--dataset", "d", "--run-dir", "r"]
    for cli in (FLOW_CLI, [*TRAIN_DIT, *required], [*EVALUATE, *required[:2]]):
        ran = _fast([*cli, "--no-such-flag"])
        assert ran.status == 2 and "unrecognized arguments: --no-such-flag" in ran.stderr[-1]
    assert len(_run([*TRAIN_DIT, *required, "--no-such-flag"]).stderr) == 1  # not 60 flags


@pytest.mark.parametrize(
    "cli",
    [[*FLOW_CLI, "--source", "/nonexistent.tgz"], [*TRAIN_DIT, "--dataset", "/x", "--run-dir", "r"],
     [*EVALUATE, "--dataset", "/x", "--dit", "d"], [*DOWNLOAD, "--source", "/nonexistent.tgz"]],
)  # fmt: skip
def test_verbose_adds_the_traceback(cli):
    assert "Traceback (most recent call last):" not in _run(cli).stderr
    verbose = _run([*cli, "--verbose"]).stderr
    assert "Traceback (most recent call last):" in verbose
    assert "--source" not in cli or any("--source '/nonexistent" in line for line in verbose)


def _unsafe_archive(tmp_path):
    members = {**oxford_members({"Bengal": 2}, {"pug": 2}), "images/../../evil.jpg": b"x"}
    return write_tar(tmp_path / "unsafe.tar.gz", members)


@pytest.mark.parametrize("failure", ["404", "checksum", "unsafe"])
def test_the_downloaders_data_errors_are_one_line_naming_the_flag(http_server, tmp_path, failure):
    data_dir = ["--data-dir", str(tmp_path / "data")]
    cli = {
        "404": ["--source", http_server.url("/absent.tar.gz")],
        "checksum": ["--source", str(OXFORD_MINI), "--checksum", "md5:" + "0" * 32],
        "unsafe": ["--source", str(_unsafe_archive(tmp_path))],
    }[failure]
    ran = _run([*DOWNLOAD, *cli, *data_dir])
    assert ran.status == 1 and "Traceback (most recent call last):" not in ran.stderr
    (line,) = [line for line in ran.stderr if " ERROR " in line]
    assert {"404": "SourceNotFoundError", "checksum": "ChecksumMismatchError",
            "unsafe": "InvalidArchiveError"}[failure] in line  # fmt: skip
    assert ("--checksum" if failure == "checksum" else "--source") in line
    assert "dataset." not in line
    verbose = _run([*DOWNLOAD, *cli, *data_dir, "--verbose"])
    assert "Traceback (most recent call last):" in verbose.stderr


def test_a_data_error_inside_a_flow_run_ends_the_cli_on_one_line(http_server):
    """The README's command, with a source that answers 404 (resolvable, so the run starts)."""
    source = http_server.url("/absent.tar.gz")
    ran = _run([*FLOW, "--deployment", "dit", "--preset", "cpu-tiny", "--source", source], 600)
    assert ran.status == 1
    text = "\n".join(ran.stderr)
    (line,) = [line for line in ran.stderr if line.startswith("train-cats:")]
    assert line.startswith("train-cats: the flow run failed: SourceNotFoundError: HTTP 404"), text
    assert line.endswith("as --source")
    assert "Traceback" not in text and "dataset.source" not in text
    # Prefect's failure records (with tracebacks) stay in the run's logs, off the console.
    assert not [line for line in ran.stderr if "| ERROR" in line]


def _artifacts(state) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return {a.key: a.data for a in found if a.key}


def test_a_deployment_run_fails_in_parameter_paths_with_an_artifact(tmp_path):
    """As a worker runs a deployment: a bad source (the flow's own checks) and a bad checksum
    (Prefect's parameter validation, before the flow body) both leave the failure artifact, in
    the parameters' words, each reason on one line."""
    missing = str(tmp_path / "absent.tar.gz")
    for parameters, expected in (
        ({"dataset": {"source": missing}}, f"dataset.source '{missing}' is not a file"),
        ({"dataset": {"checksum": "md5:xyz"}}, "dataset.checksum: checksum 'md5:xyz' is not"),
    ):
        state = train_cats(**parameters, models=["dit"], return_state=True)
        assert state.is_failed()
        failure = _artifacts(state)["failure-train-cats"]
        assert expected in failure and "--source" not in failure and "--checksum" not in failure
        (error,) = [line for line in failure.splitlines() if line.startswith("**Error:**")]
        assert expected in error


# ----------------------------------------------------------------------------------------------
# The plain-data copies that keep torch and Prefect out of the command lines agree with the
# originals.


def test_the_named_architectures_are_the_models():
    assert sorted(ARCHS) == sorted(DIT_CONFIGS)
    with torch.device("meta"):
        for name, sizes in ARCHS.items():
            built = dit_from_config(name, input_size=64, num_classes=1).config
            assert tuple(built[k] for k in ARCH_FIELDS) == sizes, name


def test_backbones_and_samplers_are_the_models():
    assert {n: s.weights is not None for n, s in classifier_model.BACKBONES.items()} == BACKBONES
    assert options.SAMPLERS == SAMPLERS


_SIZES = [
    {"arch": arch, "image_size": size, **given}
    for arch in ("DiT-Nano/4", "DiT-Ti/4", "DiT-S/8")
    for size in (24, 32)
    for given in ({}, {"patch_size": 3}, {"hidden_size": 66}, {"hidden_size": 96, "num_heads": 5},
                  {"num_heads": 8, "depth": 1}, {"patch_size": 8, "stem_channels": 4})
]  # fmt: skip


@pytest.mark.parametrize("sizes", _SIZES)
def test_a_dit_config_is_valid_exactly_when_the_model_builds(sizes):
    try:
        config = DiTConfig.model_validate({**PRESETS["cpu-tiny"].model_dump(), **sizes})
    except ValueError:
        config = None
    given = {k: v for k, v in sizes.items() if k in ARCH_FIELDS or k == "stem_channels"}
    try:
        with torch.device("meta"):
            model = dit_from_config(sizes["arch"], input_size=sizes["image_size"], num_classes=3,
                                    class_dropout_prob=0.1, **given)  # fmt: skip
    except ValueError:
        model = None
    assert (config is None) == (model is None), sizes
    if config is not None:
        built = dict(model.config) | {"mlp_ratio": config.mlp_ratio, "qk_norm": config.qk_norm}
        assert config.architecture(num_classes=3) == built


def test_the_cli_validates_the_flows_parameters_as_the_flow_declares_them():
    signature = inspect.signature(train_cats.fn).parameters
    hints = typing.get_type_hints(train_cats.fn)
    assert tuple(FlowParameters.model_fields) == tuple(signature)
    defaults = FlowParameters().model_dump()
    for name, field in FlowParameters.model_fields.items():
        assert field.annotation == hints[name], name
        default = signature[name].default
        plain = default.model_dump() if hasattr(default, "model_dump") else default
        assert defaults[name] == plain, name


def test_the_automation_command_without_a_server_ends_on_one_line():
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens on 9
    done = subprocess.run(
        [sys.executable, "-m", "flows.automations", "--webhook-url", "http://127.0.0.1:9/hook"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "did not answer (start `prefect server start`" in line and "127.0.0.1:9" in line


def test_a_modal_dit_takes_only_a_teacher_that_its_container_can_read():
    """A Modal container sees its volumes, not this machine's files: a local teacher folder is
    refused before anything starts; a champion or a folder on the runs volume is left to the
    container, which reads them."""
    from flows.parameters import _require_reachable_teacher

    with pytest.raises(ValueError, match="'/home/me/teacher' is not reachable from a Modal"):
        _require_reachable_teacher("/home/me/teacher", "modal")
    _require_reachable_teacher("champion:all", "modal")
    _require_reachable_teacher("/runs/2026-12-04/x/classifier", "modal")
    _require_reachable_teacher(None, "local")


def test_a_required_repa_teacher_without_a_classifier_champion_fails_in_one_line(tmp_path):
    """`cpu-small` aligns to the `classifier` deployment's champion; with its fallback turned off
    and no champion, the flow's command line says so, and how to get one, before anything is
    built or imported."""
    params = '{"dit": {"overrides": {"repa_fallback": "error"}}}'
    done = subprocess.run(
        [sys.executable, *FLOW_CLI, "--params", params],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TRAIN_CATS_RUNS_DIR": str(tmp_path / "runs")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "dit.repa_teacher 'champion:classifier': deployment 'classifier' has no" in line
    assert "train-cats --deployment classifier" in line
