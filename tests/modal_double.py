"""A test double for Modal's remote calls that runs the real Modal function bodies locally.

`ModalDouble.resolve(name, gpu)` stands in for `modal.Function.from_name(...).with_options(gpu=)`:
`.spawn(**kwargs)` runs `tasks.adapters.modal_app.<name>.local(**kwargs)`, in a worker thread (so the test
can record volume commits/reloads in-process) or in a child process (so `cancel()` really stops
the work, like Modal stopping a container). The volumes are plain folders: the storage roots that
the image's environment points at `/data` and `/runs` point at them instead, and
`ModalDouble.read_file` (standing in for `modal.Volume.from_name(...).read_file`) reads them.
Commit visibility is not modelled: a client-side read sees the files as the function left them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

_ids = itertools.count(1)


class RecordingVolume:
    """Stands in for a `modal.Volume`: records each commit/reload with the files present then."""

    def __init__(self, name: str, root: Path, log: list):
        self.name, self.root, self.log = name, root, log

    def _event(self, op: str) -> None:
        files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        self.log.append((op, self.name, threading.current_thread().name, files))

    def commit(self) -> None:
        self._event("commit")

    def reload(self) -> None:
        self._event("reload")


def _run_in_child(name: str, kwargs: dict, env: dict, results: Any) -> None:
    os.environ.update(env)
    from tasks.adapters import modal_app

    # The child's volumes are the same folders; its commit/reload calls go nowhere.
    modal_app.data_volume = RecordingVolume("data", Path(env["TRAIN_CATS_DATA_DIR"]), [])
    modal_app.runs_volume = RecordingVolume("runs", Path(env["TRAIN_CATS_RUNS_DIR"]), [])
    try:
        results.put(("ok", getattr(modal_app, name).local(**kwargs)))
    except BaseException as exc:
        results.put(("error", "".join(traceback.format_exception(exc))))


class FakeCall:
    """Stands in for `modal.FunctionCall`: `object_id`, `get(timeout)`, `cancel()`."""

    def __init__(self, name: str, kwargs: dict, env: dict, in_process: bool):
        self.object_id = f"fc-double{next(_ids):04d}"
        self.name, self.kwargs, self.cancels = name, kwargs, 0
        if in_process:
            self.future: Future = Future()
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()
            self.process = None
        else:
            ctx = multiprocessing.get_context("spawn")
            self.results = ctx.Queue()
            self.process = ctx.Process(target=_run_in_child, args=(name, kwargs, env, self.results))
            self.process.start()

    def _run(self) -> None:
        from tasks.adapters import modal_app

        try:
            self.future.set_result(getattr(modal_app, self.name).local(**self.kwargs))
        except BaseException as exc:
            self.future.set_exception(exc)

    def get(self, timeout: float | None = None) -> Any:
        if self.process is None:
            try:
                return self.future.result(timeout)
            except TimeoutError:
                raise TimeoutError(f"{self.object_id} still running") from None
        import queue

        try:
            status, value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.object_id} still running") from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def get_dashboard_url(self) -> str:
        return f"https://modal.com/apps/double/{self.object_id}"

    def cancel(self, terminate_containers: bool = False) -> None:
        self.cancels += 1
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


class ModalDouble:
    """Resolves function names to fakes and keeps every call for the test to inspect."""

    def __init__(self, env: dict[str, str], in_process: bool = True):
        self.env, self.in_process = env, in_process
        self.calls: list[FakeCall] = []
        self.gpus: dict[str, str | None] = {}

    def resolve(self, name: str, gpu: str | None = None) -> Any:
        double = self

        class _Function:
            def spawn(self, **kwargs: Any) -> FakeCall:
                call = FakeCall(name, kwargs, double.env, double.in_process)
                double.calls.append(call)
                double.gpus[name] = gpu
                return call

        return _Function()

    def read_file(self, volume: str, path: str) -> bytes:
        """Stands in for `b"".join(modal.Volume.from_name(volume).read_file(path))`."""
        roots = {"train-cats-data": "TRAIN_CATS_DATA_DIR", "train-cats-runs": "TRAIN_CATS_RUNS_DIR"}
        return (Path(self.env[roots[volume]]) / path).read_bytes()  # FileNotFoundError, as Modal

    def from_id(self, call_id: str) -> FakeCall:
        return next(c for c in self.calls if c.object_id == call_id)
