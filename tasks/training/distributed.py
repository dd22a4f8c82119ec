"""Data-parallel training with torch.distributed: one process per GPU in one machine (or
container), DistributedDataParallel, and the few agreements the ranks need.

Launch: `launch` starts `world_size` processes with `torch.multiprocessing` (spawn), not
`torchrun`. The trainings are Python calls (a Prefect task, a Modal function, the CLI), not
scripts: spawn keeps that one call as the entry point, returns rank 0's result to the caller, and
re-raises a rank's own exception with its type, so the caller's retry policy can tell a bad config
(ValueError) from a lost process. torchrun would need a second CLI, results through files, and a
supervisor of its own for what spawn's process context already does: when a rank dies, the
others are terminated and the call fails with one line naming the rank and its signal.

Conventions (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", §3 for DDP itself):
- The config's `batch_size` is the global batch; rank r takes rows [r*b, (r+1)*b) of it, b =
  batch_size / world_size (`data.loader.PackedBatches`). Every random draw of a step is made for
  the global batch from a generator in the same state on every rank, then sharded (`shard`), so
  K steps at world size N do the maths of K single-process steps, up to the order in which the
  all-reduce adds the gradients.
- Rank 0 alone writes (checkpoints, exports, EMA, sample grids, metrics, progress) and alone
  decides, from its time budget, whether another step runs and how many are planned; `agree`
  broadcasts that decision so that no rank waits on a collective the others skip.
- Every rank restores the same checkpoint. Since each checkpoint holds the global position, a run
  saved at world size N resumes at any M that divides the batch.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Long enough for rank 0's sample grids, evaluations and saves (the others wait at the next
# collective meanwhile); a dead rank is caught by the launcher's process watch long before this.
COLLECTIVE_TIMEOUT = timedelta(minutes=20)


class RankFailedError(RuntimeError):
    """A training process died (killed, out of memory, lost GPU); the others were stopped. An
    infrastructure failure: a retry resumes from the run dir's newest checkpoint."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: `rank` in [0, world_size)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice along dim 0 of a (B, ...) tensor drawn for the global
        batch; B must divide by world_size."""
        size = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * size : (self.rank + 1) * size]


def current() -> Ranks:
    """The ranks of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def world_size_for(config: Any) -> int:
    """`config.world_size`, else every visible CUDA device for a CUDA run, else 1."""
    if config.world_size is not None:
        return config.world_size
    if config.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def agree(go: bool, total: int, ranks: Ranks) -> tuple[bool, int]:
    """Rank 0's (whether to run another step, planned total steps), on every rank."""
    if not ranks.enabled:
        return go, total
    decision = torch.tensor([int(go), total], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        decision = decision.cuda()
    dist.broadcast(decision, src=0)
    return bool(decision[0]), int(decision[1])


def mean_across(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of a scalar over the ranks (for logging a loss of the whole global batch)."""
    if not ranks.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)  # SUM: the one reduction every backend has (gloo lacks AVG)
    return value / ranks.world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its launcher dies, even by SIGKILL, so that
    no orphaned rank trains on (and writes to the run dir) after its job is gone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's `finally` still stops the ranks on any exception


def _worker(
    rank: int,
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    port: int,
    results: Any,
    events: Any,
) -> None:
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    cuda = args[0].device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    elif args[0].num_threads is None:
        # The ranks share the machine's cores; more threads than cores would spin-wait.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        result = fn(*args, progress=events.put if rank == 0 else None)
        if rank == 0:
            results.put(("ok", result))
    except BaseException as exc:
        try:  # the exception itself, so the caller can tell a ValueError from a lost process
            results.put(("error", rank, exc, traceback.format_exc()))
        except Exception:  # an exception that does not pickle: its words, as a RuntimeError
            results.put(("error", rank, RuntimeError(repr(exc)), traceback.format_exc()))
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    progress: Callable[[dict], None] | None = None,
    poll_s: float = 0.5,
) -> Any:
    """Run `fn(*args, progress=...)` in `world_size` spawned processes joined in one process
    group (NCCL on CUDA, one GPU per rank; gloo on the CPU); return rank 0's result.

    `args[0]` is the training config (its `device` and `num_threads` decide the backend and the
    threads per rank). Rank 0's progress rows are forwarded to `progress` in this process. The
    ranks are watched every `poll_s` seconds; as soon as one fails, the others are killed.

    Raises:
        RankFailedError: a rank was killed by a signal (SIGKILL, the OOM killer) or exited
            without an exception: names the rank and its signal or exit code.
        the exception a rank raised, with its own type (a ValueError stays a ValueError) and the
            rank's traceback attached as a note.
    """
    ctx = mp.get_context("spawn")
    results, events = ctx.SimpleQueue(), ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, fn, args, world_size, port, results, events),
            name=f"rank-{rank}",
        )
        for rank in range(world_size)
    ]

    def forward_progress() -> None:
        while True:
            try:
                row = events.get_nowait()
            except queue.Empty:
                return
            if progress is not None:
                progress(row)

    try:
        for process in procs:
            process.start()
        while True:
            forward_progress()
            # One snapshot of every exit code: a rank killed from outside shows its signal even
            # if a peer has meanwhile failed on the broken collective.
            codes = [process.exitcode for process in procs]
            if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
                break
            connection.wait([process.sentinel for process in procs], timeout=poll_s)
    finally:
        for process in procs:  # none outlives the call, whatever happened
            if process.is_alive():
                process.kill()
            process.join()
    forward_progress()
    killed = [(rank, code) for rank, code in enumerate(codes) if code is not None and code < 0]
    if killed or results.empty():
        rank, code = (
            killed[0] if killed else next((r, c) for r, c in enumerate(codes) if c not in (None, 0))
        )
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise RankFailedError(
            f"rank {rank} of {world_size} died ({how}); the other ranks were stopped. A retry "
            "resumes from the run dir's newest checkpoint"
        )
    outcome = results.get()
    if outcome[0] == "ok":
        return outcome[1]
    _, rank, exc, remote_traceback = outcome
    exc.add_note(f"raised in rank {rank} of {world_size}:\n{remote_traceback}")
    raise exc
