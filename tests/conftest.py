"""Shared test set-up: isolate Prefect and the storage roots, and locate ../shared/datasets."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
OXFORD_MINI = SHARED_DATASETS / "oxford-pets-mini" / "images.tar.gz"
PETIMAGES = SHARED_DATASETS / "petimages" / "kagglecatsanddogs-180px.zip"
_ENV_ROOT = pytest.StashKey[tuple[Path, dict[str, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    """Give the test session its own Prefect home and storage roots, never the user's.

    This runs before any test module imports prefect: Prefect reads its settings (the result
    storage under PREFECT_HOME among them) at import time, so a fixture would be too late.
    """
    root = Path(tempfile.mkdtemp(prefix="train-cats-tests-"))
    config.stash[_ENV_ROOT] = (root, dict(os.environ))
    os.environ.update(
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The default 20 s wait for the temporary server timed out in CI on a busy 2-core host.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        TRAIN_CATS_DATA_DIR=str(root / "data"),
        TRAIN_CATS_RUNS_DIR=str(root / "runs"),
    )
    os.environ.pop("PREFECT_API_URL", None)  # in-process flows use a temporary server


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Stop the temporary Prefect server now, while pytest still owns the output streams;
    # Prefect's own atexit hook would log to a closed stream and print a spurious traceback.
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)  # send queued run logs while the server is still up
    SubprocessASGIServer().stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    root, saved = config.stash[_ENV_ROOT]
    os.environ.clear()
    os.environ.update(saved)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not OXFORD_MINI.is_file() or not PETIMAGES.is_file():
        pytest.fail(
            f"the shared datasets are missing under {SHARED_DATASETS}; clone next to ../shared"
        )
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def oxford_mini_species_ref(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory):
    """The shared oxford-pets-mini archive published with labels=species at 32 and 64 px.

    Returns its `data.dataset.DatasetRef` (classes ["cat", "other"], 120 cats + 250 others).
    """
    from data.dataset import DatasetSpec
    from data.download import ensure

    spec = DatasetSpec(source=str(OXFORD_MINI), labels="species", image_sizes=[32, 64])
    return ensure(spec, tmp_path_factory.mktemp("oxford-mini-data"))


@pytest.fixture
def http_server(tmp_path: Path):
    """A started `tests/http_server.FileServer` on 127.0.0.1 serving `tmp_path / "www"`."""
    from http_server import FileServer

    (tmp_path / "www").mkdir()
    with FileServer(tmp_path / "www") as server:
        yield server


@pytest.fixture
def single_thread():
    """Run a test with one intra-op torch thread, restoring the count after. For tiny models one
    thread is as fast as two, and it avoids the 10-25x slow-down that OpenMP's spinning barriers
    suffer when the two cores are shared with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_inside_the_budget(metrics: dict, budget_min: float, elapsed_s: float) -> None:
    """The time-budget contract of a trainer's result, with tolerances that hold on a loaded
    2-core machine (the reserve, not the test, absorbs the stalls)."""
    budget_s = budget_min * 60
    spent = metrics["budget_spent_s"]
    print(
        f"budget: {budget_s:g} s, spent {spent:.2f} s, reserved {metrics['budget_reserve_s']:.2f} s"
        f" for finishing, which took {metrics['budget_finish_s']:.2f} s, {metrics['steps']} steps"
    )
    # Hard: the trainer's clock starts as the call begins and stops after the final checkpoint,
    # so the exports and the last save are inside it.
    assert spent <= budget_s, (
        f"spent {spent:.3f} s of a {budget_s:g} s budget: reserved {metrics['budget_reserve_s']:.2f}"
        f" s for finishing, which took {metrics['budget_finish_s']:.2f} s"
    )
    # Outside that clock are only the config check before it and the return after it.
    assert elapsed_s - spent <= 2.0, (elapsed_s, spent)
    # The budget was used, not abandoned by a runaway reserve.
    assert spent >= 0.5 * budget_s, spent
    assert 0 < metrics["budget_finish_s"] < metrics["budget_reserve_s"] + 0.5 * budget_s


# Two cat breeds and one dog breed in the Oxford layout, for the downloader's tests.
CATS = {"Abyssinian": 4, "British_Shorthair": 4}
DOGS = {"beagle": 6}


@pytest.fixture
def oxford_tar(tmp_path: Path) -> Path:
    """A small Oxford-layout archive in `tmp_path/www`, where the `http_server` fixture serves."""
    from archive_factory import oxford_members, write_tar

    (tmp_path / "www").mkdir(exist_ok=True)
    return write_tar(tmp_path / "www" / "images.tar.gz", oxford_members(CATS, DOGS))
