"""Checkpoint files: atomic writes, rotation, corrupt-file fallback, RNG capture, resume checks."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from tasks.training import checkpoint as ckpt


def _state(step: int, **config) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(step))
    return ckpt.make_state(
        step, {"lr": 1e-3, "steps": 10, **config}, "data-v1", {"model": model}, finished=False
    )


def test_save_keeps_newest_k_and_leaves_no_temp_files(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, _state(step), keep=2)
    names = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step_000000004.pt", "step_000000005.pt"]
    assert ckpt.load_latest(tmp_path)["step"] == 5


def test_failed_write_publishes_nothing(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(1), keep=3)
    bad = _state(2)
    bad["unpicklable"] = lambda: None  # torch.save fails mid-write
    with pytest.raises(Exception, match="ickl"):
        ckpt.save_checkpoint(tmp_path, bad, keep=3)
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step_000000001.pt"]
    assert ckpt.load_latest(tmp_path)["step"] == 1


def test_corrupt_newest_is_skipped_with_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(1), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, _state(2), keep=3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated copy
    leftover = ckpt.checkpoint_dir(tmp_path) / ".step_000000003.pt.tmp-999"
    leftover.write_bytes(b"half a checkpoint")  # a writer killed mid-write
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint .*step_000000002"):
        state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1
    assert torch.all(state["model"]["weight"] == 1.0)
    assert not leftover.exists()


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    assert ckpt.resume(tmp_path, {}, "v", frozenset(), {}) == (0, False, None)


def test_rng_states_round_trip():
    gen = torch.Generator().manual_seed(5)
    saved, saved_gen = ckpt.capture_rng(), ckpt.GeneratorState(gen).state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    ckpt.restore_rng(saved)
    ckpt.GeneratorState(gen).load_state_dict(saved_gen)
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert torch.equal(first[3], second[3])


def test_resume_check_names_every_difference():
    state = _state(7, batch_size=16)
    with pytest.raises(ckpt.ResumeMismatchError) as err:
        ckpt.check_compatible(
            state, {"lr": 2e-3, "steps": 10, "batch_size": 8}, "data-v2", frozenset()
        )
    message = str(err.value)
    assert "step 7" in message
    assert "'data-v1' -> 'data-v2'" in message
    assert "lr: 0.001 -> 0.002" in message
    assert "batch_size: 16 -> 8" in message
    changed = ckpt.check_compatible(
        state, {"lr": 1e-3, "steps": 20, "batch_size": 16}, "data-v1", frozenset({"steps"})
    )
    assert changed == ["steps"]


def test_cadence_by_steps_and_by_minutes():
    by_steps = ckpt.Cadence(every_steps=5, every_minutes=60)
    assert [s for s in range(1, 12) if by_steps.due(s)] == [5, 10]
    by_time = ckpt.Cadence(every_steps=10**9, every_minutes=0.05 / 60)
    assert not by_time.due(1)
    time.sleep(0.06)
    assert by_time.due(2)
    by_time.saved()
    assert not by_time.due(3)
