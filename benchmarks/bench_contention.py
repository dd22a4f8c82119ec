"""DiT training steps under CPU contention: OpenMP wait policy and thread count, quiet vs shared.

torch's OpenMP threads spin-wait at every barrier. When another process takes one of the two
cores, a spinning thread burns the time slice its partner needs, and a step can be 2-10x slower.
This measures the `cpu-small` DiT's real training step (forward, flow-matching loss, backward,
AdamW) on random data, each setting in a fresh process for `--seconds`, with and without a busy
loop pinned to core 0, and prints steps per second side by side::

    .venv/bin/python -m benchmarks.bench_contention --seconds 20

Settings: OMP_WAIT_POLICY unset (libgomp's default, spinning for a while), PASSIVE, or a short
spin (GOMP_SPINCOUNT=10000); 2 or 1 intra-op threads, or `adaptive`: what budgeted trainings do
(`tasks/training/threads.py`: time both counts, keep the faster, re-check every 200 steps or on a slowdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.under_load import _cpu_name

STEP = """
import json, sys, time, torch
from tasks.training.threads import AdaptiveThreads
adaptive = sys.argv[2] == "adaptive"
torch.set_num_threads(2 if adaptive else int(sys.argv[2]))
governor = AdaptiveThreads(2) if adaptive else None
from models.dit import DiT
from models.flow_matching import flow_matching_loss
from tasks.train_dit import PRESETS, DiTConfig
config = DiTConfig.model_validate(PRESETS["cpu-small-no-teacher"])
model = DiT(**config.architecture(2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(config.batch_size, 3, config.image_size, config.image_size)
y = torch.randint(0, 2, (config.batch_size,))
def step():
    loss = flow_matching_loss(model, x, y, config.time_schedule)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3): step()
t0, n = time.monotonic(), 0
while time.monotonic() - t0 < float(sys.argv[1]):
    t = time.monotonic(); step(); n += 1
    if governor: governor.step_done(time.monotonic() - t)
print(json.dumps({"steps_per_s": n / (time.monotonic() - t0), "policy": "%s"}))
"""


def _measure(seconds: float, threads: int | str, policy: str | None, hog: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy == "SPIN10K":  # spin briefly (libgomp's default is 300,000), then sleep
        env["GOMP_SPINCOUNT"] = "10000"
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    hogs = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])]
    if not hog:
        hogs.pop().kill()
    try:
        out = subprocess.run(
            [sys.executable, "-c", STEP % (policy or "default"), str(seconds), str(threads)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        for p in hogs:
            p.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(f"{_cpu_name()}, {os.cpu_count()} cores; cpu-small DiT steps/s over {args.seconds:g} s")
    print("| OMP_WAIT_POLICY | threads | quiet | core 0 busy | kept |")
    print("|---|---|---|---|---|")
    settings = [(p, t) for p in (None, "PASSIVE", "SPIN10K") for t in (2, 1)] + [(None, "adaptive")]
    for policy, threads in settings:
        quiet = _measure(args.seconds, threads, policy, hog=False)
        busy = _measure(args.seconds, threads, policy, hog=True)
        print(
            f"| {policy or 'default'} | {threads} | {quiet:.2f} | {busy:.2f} | {busy / quiet:.0%} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
