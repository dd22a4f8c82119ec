"""benchmarks/bench_train.py: each preset's trainings in each requested precision, side by side."""

from __future__ import annotations

from benchmarks import bench_train
from tasks.training.runtime import cpu_has_native_bf16


def test_each_pair_trains_once_per_requested_precision(oxford_mini_species_ref, capsys):
    # bf16 only where the CPU multiplies it in hardware: emulated, the bf16 matmul peak alone
    # takes minutes. Elsewhere `auto` is the second precision, and must resolve to fp32.
    second, label = ("bf16", "bf16") if cpu_has_native_bf16() else ("auto", "auto:fp32")
    argv = ["--presets", "cpu-tiny", "--steps", "6", "--precisions", "fp32", second]
    assert bench_train.main([*argv, "--dataset", oxford_mini_species_ref.model_dump_json()]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [r for r in rows if r and r[0] == "cpu-tiny"]
    # One row per (model, precision), in the precision the run computed in, with a measured speed.
    assert [(r[1], r[2]) for r in table] == [
        ("dit", "fp32"),
        ("dit", label),
        ("classifier", "fp32"),
        ("classifier", label),
    ]
    assert all(float(r[6]) > 0 for r in table)  # images/s
    peak = f"{label.split(':')[-1]} matmul peak"
    assert "fp32 matmul peak" in " ".join(table[0]) and peak in " ".join(table[1])
