"""What determines a deployment's model, and what changed since its champion (no torch, no Prefect).

A fingerprint has three parts, the three things that decide what a training computes:
- `dataset`: the dataset spec with the source's revision (`data.revision`: an http ETag or
  Last-Modified, or a local archive's sha256);
- `code`: a hash of the project's Python sources under data/, models/ and tasks/ and of the
  lock file (flows/ only orchestrates);
- `configs`: each model's resolved training config (preset + overrides), less the fields that
  only change how a run is logged or executed (`OBSERVATIONAL`).

A scheduled run compares its fingerprint with its champion's (`tasks.champions`); equal means the
retraining would compute the same model, so it is skipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("data", "models", "tasks")
LOCK_FILE = "requirements.lock"
# Config fields that change how a run is observed or executed, not the model it computes.
OBSERVATIONAL = frozenset(
    {"progress_bar", "log_every", "num_threads", "adaptive_threads", "keep_checkpoints",
     "ckpt_every_steps", "ckpt_every_minutes", "sample_every", "device_cache_fraction",
     "world_size", "compile", "sdpa_backend"}
)  # fmt: skip


def code_version(repo: Path = REPO) -> str:
    """`sha256:<hex>` over the relative path and bytes of every `*.py` under CODE_DIRS and the
    lock file; the same checkout gives the same value on every machine."""
    digest = hashlib.sha256()
    files = sorted(p for d in CODE_DIRS for p in (repo / d).rglob("*.py"))
    lock = repo / LOCK_FILE
    for path in [*files, *([lock] if lock.is_file() else [])]:
        digest.update(str(path.relative_to(repo)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def fingerprint(dataset: dict[str, Any], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fingerprint of a run: `dataset` (a DatasetSpec dump, source_revision included) and each
    model's config dump."""
    kept = {
        model: {k: v for k, v in sorted(config.items()) if k not in OBSERVATIONAL}
        for model, config in sorted(configs.items())
    }
    return {"dataset": dataset, "code": code_version(), "configs": kept}


def changes(current: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """What differs between two fingerprints, one short line each; [] when nothing does."""
    if not previous:
        return ["no champion yet"]
    lines = []
    for field in sorted(set(current["dataset"]) | set(previous.get("dataset", {}))):
        a, b = previous.get("dataset", {}).get(field), current["dataset"].get(field)
        if a != b:
            lines.append(f"dataset.{field}: {a!r} -> {b!r}")
    if current["code"] != previous.get("code"):
        lines.append(f"code: {str(previous.get('code'))[:19]}… -> {current['code'][:19]}…")
    for model in sorted(set(current["configs"]) | set(previous.get("configs", {}))):
        a, b = previous.get("configs", {}).get(model, {}), current["configs"].get(model, {})
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                lines.append(f"{model}.{field}: {a.get(field)!r} -> {b.get(field)!r}")
    return lines
