"""benchmarks/bench_train.py: each preset's trainings in each requested precision, side by side."""

from __future__ import annotations

from benchmarks import bench_train


def test_each_pair_trains_once_per_requested_precision(capsys):
    assert (
        bench_train.main(["--presets", "cpu-tiny", "--steps", "6", "--precisions", "fp32", "bf16"])
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [r for r in rows if r and r[0] == "cpu-tiny"]
    # One row per (model, precision), in the precision the run computed in, with a measured speed.
    assert [(r[1], r[2]) for r in table] == [
        ("dit", "fp32"),
        ("dit", "bf16"),
        ("classifier", "fp32"),
        ("classifier", "bf16"),
    ]
    assert all(float(r[6]) > 0 for r in table)  # images/s
    assert "fp32 matmul peak" in " ".join(table[0]) and "bf16 matmul peak" in " ".join(table[1])
