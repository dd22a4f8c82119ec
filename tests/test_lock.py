"""The lock files: they cover pyproject.toml, agree with each other, and are what is installed."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version

import pytest
from lockfile import DEV_LOCK, REPO, RUNTIME_LOCK, load_pyproject, lock_problems, read_lock
from packaging.version import Version


def test_the_locks_cover_every_dependency_of_pyproject():
    problems = lock_problems(load_pyproject(), read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK))
    assert not problems, "\n".join(problems)


def test_a_dependency_the_lock_lacks_or_contradicts_is_named():
    pyproject = load_pyproject()
    pyproject["project"]["dependencies"] = [
        *pyproject["project"]["dependencies"],
        "brand-new-package>=1",
    ]
    pyproject["project"]["optional-dependencies"]["dev"].append("pytest-xdist>=3")
    pyproject["tool"]["uv"]["constraint-dependencies"] = ["torch==2.99.0"]
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    dev["filelock"] = "0.1"
    problems = lock_problems(pyproject, runtime, dev)
    assert len(problems) == 4, problems
    assert "brand-new-package, which requirements.lock lacks" in problems[0]
    assert "pytest-xdist, which requirements-dev.lock lacks" in problems[1]
    assert "torch==2.14.1, outside pyproject.toml's '==2.99.0'" in problems[2]
    assert "requirements-dev.lock has filelock==0.1" in problems[3]
    assert all(p.endswith("run `bash setup.sh --lock`") for p in problems)


def test_a_lock_line_that_is_not_an_exact_pin_is_refused(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("requests==2.34.2\n    # via tests\nfilelock>=4\n")
    with pytest.raises(ValueError, match="'filelock>=4' is not an exact pin; run `bash setup"):
        read_lock(lock)


def test_every_locked_package_is_installed_at_its_locked_version():
    wrong = []
    for name, pinned in read_lock(DEV_LOCK).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "nothing"
        # A local build label (torch 2.14.1+cpu) is the same release.
        if installed == "nothing" or Version(installed).public != Version(pinned).public:
            wrong.append(f"{name}: locked {pinned}, installed {installed}")
    assert not wrong, "run `bash setup.sh --dev`:\n" + "\n".join(wrong)


def test_setup_installs_torch_at_the_version_the_lock_names():
    import torch
    import torchvision

    lock = read_lock(RUNTIME_LOCK)
    assert Version(torch.__version__).public == lock["torch"] == "2.14.1"
    assert Version(torchvision.__version__).public == lock["torchvision"] == "0.29.1"


def test_setup_refuses_an_unknown_option_in_one_line():
    result = subprocess.run(
        ["bash", "setup.sh", "--bogus"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "setup.sh: unknown option '--bogus'; use no option, --dev or --lock"
    ]
