"""The floor plan holds: imports run data -> models -> tasks -> flows, and inside tasks/ from the
shared machinery up to the adapters, never the other way (docs/ARCHITECTURE.md draws it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "tasks", "flows")
# Lowest first. A module may import its own rank or lower. Longest prefix wins.
RANKS = {
    "data": 0,
    "models": 1,
    "tasks.paths": 2,
    "tasks.champions": 2,
    "tasks.fingerprint": 2,
    "tasks.promotion": 7,
    "tasks.training": 3,
    # REPA's teacher is an export, loaded with tasks.exported; only train_dit uses it.
    "tasks.training.repa": 4,
    "tasks.exported": 4,
    "tasks.configs": 4,
    "tasks.evaluation": 5,
    "tasks.train_dit": 6,
    "tasks.train_classifier": 6,
    "tasks.train": 7,
    "tasks.evaluate": 7,
    "tasks.adapters": 8,
    "flows": 9,
}
# Files of a size a reader can hold; the model file follows its paper top to bottom (STYLE.md).
MAX_LINES = 400
LONG_BY_DESIGN = {"models/dit.py"}


def rank(module: str) -> int | None:
    keys = [k for k in RANKS if module == k or module.startswith(k + ".")]
    return RANKS[max(keys, key=len)] if keys else None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, package: str) -> set[str]:
    """Project modules imported anywhere in `source` (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the package
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            names.add(f"{base}.{node.module}" if node.module else base)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def upward_imports(module: str, source: str, package: str) -> list[str]:
    own = rank(module)
    return sorted(
        f"{module} imports {target}"
        for target in imported(source, package)
        if (r := rank(target)) is not None and own is not None and r > own
    )


def project_files() -> list[Path]:
    """Every module of the four packages, less the empty package markers."""
    return sorted(
        p
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__init__.py" or p.read_text().strip()
    )


def test_every_project_module_has_a_rank():
    unranked = [module_name(p) for p in project_files() if rank(module_name(p)) is None]
    assert not unranked, f"add these to RANKS (and docs/ARCHITECTURE.md): {unranked}"


def test_no_import_points_upward():
    problems = []
    for path in project_files():
        module = module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        problems += upward_imports(module, path.read_text(), package)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("models.dit", "from tasks.training import budget", "models.dit imports tasks.training"),
        ("data.fetch", "def f():\n    import flows.cli\n", "data.fetch imports flows.cli"),
        ("tasks.training.run", "from tasks.evaluate import evaluate", "imports tasks.evaluate"),
        ("tasks.evaluation.compute", "from ..adapters import artifacts", "tasks.adapters"),
    ],
)
def test_an_upward_import_is_caught(module, source, expected):
    package = module.rsplit(".", 1)[0]
    assert any(expected in line for line in upward_imports(module, source, package))


def test_files_stay_readable_in_length():
    long = {
        str(p.relative_to(REPO)): n
        for p in [*project_files(), *(REPO / "tests").glob("*.py")]
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= LONG_BY_DESIGN, long
