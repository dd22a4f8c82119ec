"""The container check: the Modal image carries every file the remote functions need.

The file set is computed from the image definition itself (the same objects ``modal deploy``
uploads), copied alone into a temporary folder that stands for the container's ``/root``, and the
remote functions' modules are imported and ``data/download.py --help`` is run there, by a Python that
cannot see the repository. Its third-party packages come from a view of the venv's site-packages
holding only what the image's ``pip install -r requirements.lock`` installs. The image must install
exactly that lock, whose versions tests/test_lock.py checks against this venv. A file or a wheel
missing from the image fails here, not on a GPU at 3 a.m.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath

import modal
import modal.mount
import pytest
from lockfile import RUNTIME_LOCK, read_lock
from modal._utils.async_utils import synchronizer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tasks.adapters import modal_app

REPO = Path(__file__).resolve().parents[1]
CONTAINER_ROOT = PurePosixPath("/root")
# The walk below uses Modal internals; they are checked against this exact client version.
MODAL_VERSION = "1.6.4"


def remote_functions() -> dict[str, modal.Function]:
    return {
        name: value for name, value in vars(modal_app).items() if isinstance(value, modal.Function)
    }


def _mounts(*objects) -> list:
    """Every Mount reachable from the given (synchronised) Modal objects."""
    stack = [synchronizer._translate_in(o) for o in objects]
    seen, mounts = set(), []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, modal.mount._Mount):
            mounts.append(obj)
        if getattr(obj, "_deps", None):
            stack.extend(obj._deps())
    return mounts


def image_layers() -> list[tuple[list[str], dict[str, str]]]:
    """(Dockerfile commands, context files) of every layer of the image, at Modal's newest image
    builder version, as `modal deploy` would send them."""
    from modal._image import LATEST_IMAGE_BUILDER_VERSION

    layers, stack, seen = [], [synchronizer._translate_in(modal_app.image)], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        load = getattr(obj, "_load", None)
        build = load and inspect.getclosurevars(load).nonlocals.get("dockerfile_function")
        if build:
            spec = build(LATEST_IMAGE_BUILDER_VERSION)
            layers.append((spec.commands, dict(spec.context_files)))
        if getattr(obj, "_deps", None):
            stack.extend(obj._deps())
    if not layers:
        pytest.fail("walking the Modal image found no layers: Modal's internals changed")
    return layers


def container_files() -> dict[PurePosixPath, Path]:
    """Container path -> local file, for the image and every function's own mounts."""
    functions = remote_functions().values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = [m for f in functions for m in synchronizer._translate_in(f)._spec_.mounts]
    mounts = _mounts(modal_app.image, *extra)
    files = {}
    for mount in mounts:
        for entry in mount._entries or []:  # None: a mount defined remotely, not from local files
            for local, remote in entry.get_files_to_upload():
                files[PurePosixPath(remote)] = Path(local)
    if not files:
        pytest.fail("walking the Modal image found no mounted files: Modal's internals changed")
    return files


def pip_closure(requirements: list[str]) -> list:
    """The installed distributions ``pip install <requirements>`` would bring, dependencies included.

    Requirements absent from this venv are skipped: they are the CUDA wheels the CPU venv lacks,
    and a module that is not installed here cannot be imported from the view anyway.
    """
    todo = [Requirement(r) for r in requirements]
    extras_seen: dict[str, set[str]] = {}
    found = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras_seen and req.extras <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(req.extras)
        try:
            found[name] = dist = distribution(req.name)
        except PackageNotFoundError:
            continue
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": e}) for e in {"", *req.extras}
            ):
                todo.append(dep)
    return list(found.values())


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A site-packages holding only the locked wheels (and their closure, which the lock must
    already hold), as symlinks into the venv."""
    view = tmp_path_factory.mktemp("site-packages")
    locked = [f"{name}=={pinned}" for name, pinned in read_lock(RUNTIME_LOCK).items()]
    for dist in pip_closure(locked):
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if file.parts[0] == ".." or not source.is_file():  # scripts in bin/, absent .pyc
                continue
            (view / file).parent.mkdir(parents=True, exist_ok=True)
            (view / file).symlink_to(source)
    return view


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Path:
    """A folder holding exactly the image's files, laid out as under the container's /root."""
    root = tmp_path_factory.mktemp("container") / "root"
    for remote, local in container_files().items():
        target = root / remote.relative_to(CONTAINER_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, target)
    return root


def _run(args: list[str], cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    # -S: no site processing, so neither the venv's site-packages nor the editable install's
    # finder (which would quietly import the repository's copy of any missing module) is on the
    # path; third-party wheels come from the ``wheels`` view via PYTHONPATH.
    env = {"PYTHONPATH": ":".join(map(str, pythonpath)), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_modal_client_is_the_version_the_walk_was_written_for():
    assert modal.__version__ == MODAL_VERSION, (
        f"tests/test_modal_image.py walks Modal internals checked on modal {MODAL_VERSION}; "
        f"re-check the walk against modal {modal.__version__} and update MODAL_VERSION"
    )


def test_image_carries_the_shared_package_list_and_data_files():
    files = container_files()
    for package in modal_app.PYTHON_SOURCES:
        assert CONTAINER_ROOT / package / "__init__.py" in files, f"{package} missing from image"
    # add_local_python_source carries *.py only; nothing in the image reads other files.
    assert all(p.suffix == ".py" for p in files)


def test_the_image_installs_the_lock_and_nothing_else():
    requirement_files = [files for _, files in image_layers() if "/.requirements.txt" in files]
    assert [Path(f["/.requirements.txt"]) for f in requirement_files] == [RUNTIME_LOCK]
    ours = [c for commands, _ in image_layers() for c in commands if "pip install" in c]
    # Modal's own base layer upgrades pip/wheel/uv; every other install is the lock's.
    assert [c for c in ours if "--upgrade pip" not in c] == [
        "RUN python -m pip install -r /.requirements.txt"
    ]


def test_the_wheels_view_holds_the_pins_and_nothing_unpinned(wheels):
    assert (wheels / "torch_fidelity" / "__init__.py").is_file()  # locked, not via an extra
    assert (wheels / "modal" / "__init__.py").is_file()
    assert not (wheels / "pytest").exists() and not (wheels / "ruff").exists()  # dev tools


def test_remote_modules_import_from_the_image_alone(container, wheels):
    modules = sorted(
        {synchronizer._translate_in(f)._raw_f.__module__ for f in remote_functions().values()}
    )
    assert "tasks.adapters.modal_app" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "ours = [m for m in sys.modules.values() if getattr(m, '__file__', None)"
        f" and m.__name__.split('.')[0] in {list(modal_app.PYTHON_SOURCES)!r}]\n"
        "outside = [m.__file__ for m in ours if not m.__file__.startswith(sys.argv[1])]\n"
        "assert not outside, outside\n"
        "print(len(ours), 'project modules imported')\n"
    )
    result = _run(["-c", script, str(container)], container, [container, wheels])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "project modules imported" in result.stdout


def test_download_script_runs_from_the_image_alone(container, wheels):
    result = _run(["data/download.py", "--help"], container, [wheels])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--source" in result.stdout


def test_a_file_missing_from_the_image_fails_the_check(container, wheels, tmp_path):
    broken = tmp_path / "root"
    shutil.copytree(container, broken)
    (broken / "data" / "download.py").unlink()
    result = _run(["data/download.py", "--help"], broken, [wheels])
    assert result.returncode != 0
    result = _run(["-c", "import tasks.adapters.modal_app"], broken, [broken, wheels])
    assert result.returncode != 0
    assert "data.download" in result.stderr or "download" in result.stderr
