"""Steps a budgeted `cpu-small` DiT training makes, quiet against contended, with and without the
adaptive thread count (issue #22 §7): the whole trainer, its evaluations and exports included.

Each run is `tasks.train_dit.train_dit` with the `cpu-small` preset and `--budget` minutes on the
shared oxford-pets-mini archive (species, 32 px), in a fresh process; "contended" adds a busy loop
pinned to core 0. Four runs of `--budget` minutes each::

    .venv/bin/python -m benchmarks.bench_budget_contention --budget 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.under_load import _cpu_name

REPO = Path(__file__).resolve().parents[1]
OXFORD_MINI = REPO.parent / "shared" / "datasets" / "oxford-pets-mini" / "images.tar.gz"

RUN = """
import json, sys
from tasks.train_dit import PRESETS, train_dit
config = PRESETS["cpu-small-no-teacher"].model_copy(update={
    "time_budget_minutes": float(sys.argv[1]), "adaptive_threads": sys.argv[2] == "on",
    "progress_bar": False})
result = train_dit(config, sys.argv[3], sys.argv[4])
m = result["metrics"]
print(json.dumps({"steps": m["steps"], "spent": m["budget_spent_s"], "threads": m["threads"]}))
"""


def _run(budget: float, adaptive: bool, hog: bool, ref: str, work: Path) -> dict:
    hogs = []
    if hog:
        hogs.append(subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while 1: pass"]))
    run_dir = work / f"run-{adaptive}-{hog}"
    try:
        out = subprocess.run(
            [sys.executable, "-c", RUN, str(budget), "on" if adaptive else "off", ref, str(run_dir)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        for p in hogs:
            p.kill()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["thread_choices"] = [r["threads"] for r in rows if r.get("kind") == "threads"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0, help="minutes per run")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be > 0 minutes")
    from data.dataset import DatasetSpec
    from data.download import ensure

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = DatasetSpec(source=str(OXFORD_MINI), labels="species", image_sizes=[32])
        ref = ensure(spec, work / "data").model_dump_json()
        print(f"{_cpu_name()}, {os.cpu_count()} cores; cpu-small DiT, {args.budget:g}-minute budget")
        print("| adaptive threads | quiet steps | core 0 busy steps | kept | choices (busy) |")
        print("|---|---|---|---|---|")
        for adaptive in (False, True):
            quiet = _run(args.budget, adaptive, False, ref, work)
            busy = _run(args.budget, adaptive, True, ref, work)
            print(
                f"| {'on' if adaptive else 'off'} | {quiet['steps']} | {busy['steps']} "
                f"| {busy['steps'] / max(1, quiet['steps']):.0%} | {busy['thread_choices']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
