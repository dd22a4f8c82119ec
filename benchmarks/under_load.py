"""Run tests repeatedly beside a CPU-hungry process, and count how often each passes.

A pipeline worker is often a shared machine, so the tests that involve time (the trainers' time
budgets) must hold there too. This starts a busy loop pinned to core 0 (``--hogs``: how many),
runs the chosen pytest selection ``--rounds`` times, and prints each test's pass count::

    .venv/bin/python -m benchmarks.under_load --rounds 5 \\
        tests/test_train_dit.py::test_time_budget_finishes_with_exports_inside_it \\
        tests/test_train_classifier.py::test_time_budget_finishes_with_exports_inside_it

``--hogs 0`` gives the quiet baseline. Each budgeted training also prints its spent time, the
reserve it planned for finishing and what finishing really took (``-s`` output of the tests).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import subprocess
import sys
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="+", help="pytest node ids or files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=1, help="busy loops pinned to core 0")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.hogs < 0:
        parser.error("--rounds must be >= 1 and --hogs >= 0")
    hog = "while True: pass"
    hogs = [
        subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", hog])
        for _ in range(args.hogs)
    ]
    passed: collections.Counter[str] = collections.Counter()
    seen: set[str] = set()
    budget_lines = []
    try:
        for round_ in range(1, args.rounds + 1):
            t0 = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-rA", "-s", "-p", "no:cacheprovider",
                 *args.tests],
                capture_output=True, text=True,
            )  # fmt: skip
            for status, node in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", result.stdout, re.M):
                seen.add(node)
                passed[node] += status == "PASSED"
            budget_lines += re.findall(r"budget: .*$", result.stdout, re.M)
            print(f"round {round_}: exit {result.returncode} in {time.monotonic() - t0:.0f} s")
            if result.returncode == 1:  # the failing assertions, one line each
                print("\n".join(re.findall(r"^E   .*$", result.stdout, re.M)[:6]))
            elif result.returncode != 0:
                print(result.stdout[-3000:] + result.stderr[-3000:])
    finally:
        for p in hogs:
            p.kill()
    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, {args.hogs} busy loop(s) on core 0")
    for line in budget_lines:
        print(line)
    for node in sorted(seen):
        print(f"{passed[node]}/{args.rounds} passed  {node}")
    return 0 if seen and all(passed[n] == args.rounds for n in seen) else 1


if __name__ == "__main__":
    sys.exit(main())
