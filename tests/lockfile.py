"""Reading the lock files and checking them against pyproject.toml (used by test_lock and
test_modal_image)."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
REFRESH = "bash setup.sh --lock"


def read_lock(path: Path) -> dict[str, str]:
    """Canonical package name -> exact version, for every `name==version` line of a lock file.

    Raises ValueError for a requirement line that is not an exact pin (a hand edit)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        spec = list(requirement.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or "*" in spec[0].version:
            raise ValueError(f"{path.name}: '{line}' is not an exact pin; run `{REFRESH}`")
        pins[canonicalize_name(requirement.name)] = spec[0].version
    return pins


def lock_problems(pyproject: dict, runtime: dict[str, str], dev: dict[str, str]) -> list[str]:
    """Each way the locks fail pyproject.toml, one line naming the package; [] when they agree.

    Checks: every runtime dependency is in the runtime lock and every dev tool in the dev lock,
    at a version its range admits; the `[tool.uv]` constraints (torch) are locked exactly; the
    dev lock holds the runtime lock unchanged."""
    project = pyproject["project"]
    wanted = [(r, runtime, "requirements.lock") for r in project["dependencies"]]
    wanted += [
        (r, dev, "requirements-dev.lock")
        for r in project.get("optional-dependencies", {}).get("dev", [])
    ]
    wanted += [
        (r, runtime, "requirements.lock")
        for r in pyproject.get("tool", {}).get("uv", {}).get("constraint-dependencies", [])
    ]
    problems = []
    for text, lock, lock_name in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in lock:
            problems.append(f"pyproject.toml needs {name}, which {lock_name} lacks; run `{REFRESH}`")
        elif not requirement.specifier.contains(lock[name], prereleases=True):
            problems.append(
                f"{lock_name} pins {name}=={lock[name]}, outside pyproject.toml's "
                f"'{requirement.specifier}'; run `{REFRESH}`"
            )
    for name, pinned in runtime.items():
        if dev.get(name) != pinned:
            problems.append(
                f"requirements-dev.lock has {name}=={dev.get(name)}, requirements.lock "
                f"{name}=={pinned}; run `{REFRESH}`"
            )
    return problems


def load_pyproject(path: Path = REPO / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())
