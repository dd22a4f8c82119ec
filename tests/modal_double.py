"""A test double for Modal's remote calls that runs the real Modal function bodies locally.

`ModalDouble.resolve(name, **options)` stands in for
`modal.Function.from_name(...).with_options(**options)` and records the options (gpu, timeout,
retries). `.spawn(**kwargs)` runs `tasks.adapters.modal_app.<name>.local(**kwargs)`, in a worker thread (so the test
can record volume commits/reloads in-process) or in a child process (so `cancel()` really stops
the work, like Modal stopping a container). `ModalDouble.script` injects infrastructure faults per
spawn of a function: "queued" (never gets a container), "hang" (started, never finishes until
cancelled) or "internal_failure" (Modal's `InternalFailure`); "run" (the default) runs the body. The volumes are plain folders: the storage roots that
the image's environment points at `/data` and `/runs` point at them instead, and
`ModalDouble.read_file` (standing in for `modal.Volume.from_name(...).read_file`) reads them.
Commit visibility is not modelled: a client-side read sees the files as the function left them.
`FakeDict` stands in for a named `modal.Dict` (the progress rows, the dataset-build leases): one
in-memory instance per name, shared by the client side (`modal_calls.modal_dict`) and the function
bodies run in threads; a child process gets its own, empty ones.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from modal.call_graph import InputInfo, InputStatus
from modal.exception import InternalFailure, RemoteError

_ids = itertools.count(1)
# A "hang" or "queued" call that nobody cancels gives up after this long, so that a broken
# implementation fails its test instead of hanging the suite.
STUCK_S = 300.0


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


class FakeDict:
    """Stands in for `modal.Dict`: `put` (with Modal's atomic `skip_if_exists`), `get`, `pop`,
    `contains`; thread-safe. `puts` counts the writes per key."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}
        self.puts: dict[Any, int] = {}
        self.lock = threading.Lock()

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        with self.lock:
            if skip_if_exists and key in self.data:
                return False
            self.data[key] = value
            self.puts[key] = self.puts.get(key, 0) + 1
            return True

    def get(self, key: Any, default: Any = None) -> Any:
        with self.lock:
            return self.data.get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        with self.lock:
            if key not in self.data and default:
                return default[0]
            return self.data.pop(key)

    def contains(self, key: Any) -> bool:
        with self.lock:
            return key in self.data


def _run_in_child(name: str, kwargs: dict, env: dict, results: Any) -> None:
    os.environ.update(env)
    from tasks.adapters import modal_app

    # The child's volumes are the same folders; its commit/reload calls go nowhere.
    modal_app.data_volume = RecordingVolume("data", Path(env["TRAIN_CATS_DATA_DIR"]), [])
    modal_app.runs_volume = RecordingVolume("runs", Path(env["TRAIN_CATS_RUNS_DIR"]), [])
    modal_app.progress_dict, modal_app.build_leases = FakeDict(), FakeDict()
    try:
        results.put(("ok", getattr(modal_app, name).local(**kwargs)))
    except BaseException as exc:
        results.put(("error", "".join(traceback.format_exception(exc))))


class FakeCall:
    """Stands in for `modal.FunctionCall`: `object_id`, `get(timeout)`, `cancel()`,
    `get_call_graph()`; `cancelled_at` and `finished_at` are `time.monotonic()` stamps."""

    def __init__(self, name: str, kwargs: dict, env: dict, in_process: bool, behaviour: str = "run"):
        self.object_id = f"fc-double{next(_ids):04d}"
        self.name, self.kwargs, self.cancels, self.behaviour = name, kwargs, 0, behaviour
        self.created = time.monotonic()
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None
        self.finished_at: float | None = None
        self.process = None
        self.future: Future = Future()
        if behaviour == "internal_failure":
            self._finish(exc=InternalFailure(f"{self.object_id}: worker lost (injected)"))
        elif behaviour != "run":
            pass  # "queued" / "hang": nothing runs until cancelled
        elif in_process:
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()
        else:
            ctx = multiprocessing.get_context("spawn")
            self.results = ctx.Queue()
            self.process = ctx.Process(target=_run_in_child, args=(name, kwargs, env, self.results))
            self.process.start()

    def _finish(self, result: Any = None, exc: BaseException | None = None) -> None:
        self.finished_at = time.monotonic()
        if exc is None:
            self.future.set_result(result)
        else:
            self.future.set_exception(exc)

    def _run(self) -> None:
        from tasks.adapters import modal_app

        try:
            result = getattr(modal_app, self.name).local(**self.kwargs)
        except BaseException as exc:
            self._finish(exc=exc)
        else:
            self._finish(result)

    def get(self, timeout: float | None = None) -> Any:
        if self.cancelled.is_set():
            raise RemoteError(f"{self.object_id} was cancelled")
        if self.behaviour in ("queued", "hang"):
            if time.monotonic() - self.created > STUCK_S:
                raise RuntimeError(f"{self.object_id} ({self.behaviour}) was never cancelled")
            if self.cancelled.wait(timeout):
                raise RemoteError(f"{self.object_id} was cancelled")
            raise TimeoutError(f"{self.object_id} still {self.behaviour}")
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

    def get_call_graph(self) -> list[InputInfo]:
        """One input: no container while "queued"; PENDING while running; then its outcome."""
        if self.behaviour == "queued" or self.cancelled.is_set():
            status = InputStatus.TERMINATED if self.cancelled.is_set() else InputStatus.PENDING
            task_id = ""
        else:
            task_id = f"ta-{self.object_id}"
            status = InputStatus.PENDING
            if self.future.done():
                failed = self.future.exception() is not None
                status = InputStatus.FAILURE if failed else InputStatus.SUCCESS
        return [InputInfo(f"in-{self.object_id}", self.object_id, task_id, status, self.name,
                          "tasks.adapters.modal_app", [])]  # fmt: skip

    def get_dashboard_url(self) -> str:
        return f"https://modal.com/apps/double/{self.object_id}"

    def cancel(self, terminate_containers: bool = False) -> None:
        self.cancels += 1
        if self.cancelled_at is None and self.finished_at is None:
            self.cancelled_at = time.monotonic()
            self.cancelled.set()
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


class ModalDouble:
    """Resolves function names to fakes and keeps every call for the test to inspect."""

    def __init__(self, env: dict[str, str], in_process: bool = True):
        self.env, self.in_process = env, in_process
        self.calls: list[FakeCall] = []
        self.gpus: dict[str, str | None] = {}
        self.options: dict[str, dict] = {}
        # function name -> behaviours of its successive spawns (see the module docstring)
        self.script: dict[str, list[str]] = {}

    def resolve(self, name: str, **options: Any) -> Any:
        double = self

        class _Function:
            def spawn(self, **kwargs: Any) -> FakeCall:
                script = double.script.get(name) or ["run"]
                behaviour = script.pop(0) if len(script) > 1 else script[0]
                call = FakeCall(name, kwargs, double.env, double.in_process, behaviour)
                double.calls.append(call)
                double.gpus[name] = options.get("gpu")
                double.options[name] = options
                return call

        return _Function()

    def read_file(self, volume: str, path: str) -> bytes:
        """Stands in for `b"".join(modal.Volume.from_name(volume).read_file(path))`."""
        roots = {"train-cats-data": "TRAIN_CATS_DATA_DIR", "train-cats-runs": "TRAIN_CATS_RUNS_DIR"}
        return (Path(self.env[roots[volume]]) / path).read_bytes()  # FileNotFoundError, as Modal

    def list_dir(self, volume: str, path: str) -> list[str]:
        """Stands in for `modal_calls.list_volume_dir`: the names in a folder, [] when none."""
        folder = Path(self.env["TRAIN_CATS_RUNS_DIR" if volume == "train-cats-runs" else
                               "TRAIN_CATS_DATA_DIR"]) / path  # fmt: skip
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def from_id(self, call_id: str) -> FakeCall:
        return next(c for c in self.calls if c.object_id == call_id)


def wire_volumes(tmp_path: Path, monkeypatch: Any) -> dict:
    """Two folders standing in for the volumes, wired as the image wires /data and /runs, the
    Modal Dicts (in memory, on both sides), and fake Modal credentials. Returns {"data", "runs",
    "log" (RecordingVolume events), "env", "dicts" (name -> FakeDict)}. The loggers that the
    function bodies configure get their handlers and level back at teardown."""
    from tasks.adapters import modal_app, modal_calls
    from tasks.paths import BUILDS_DICT, PROGRESS_DICT

    data, runs, log = tmp_path / "vol-data", tmp_path / "vol-runs", []
    data.mkdir()
    runs.mkdir()
    env = {"TRAIN_CATS_DATA_DIR": str(data), "TRAIN_CATS_RUNS_DIR": str(runs)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test-double")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test-double")
    monkeypatch.setattr(modal_app, "data_volume", RecordingVolume("data", data, log))
    monkeypatch.setattr(modal_app, "runs_volume", RecordingVolume("runs", runs, log))
    dicts = {PROGRESS_DICT: FakeDict(), BUILDS_DICT: FakeDict()}
    monkeypatch.setattr(modal_app, "progress_dict", dicts[PROGRESS_DICT])
    monkeypatch.setattr(modal_app, "build_leases", dicts[BUILDS_DICT])
    monkeypatch.setattr(modal_calls, "modal_dict", dicts.__getitem__)
    for name in modal_app.LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "level", logger.level)
    return {"data": data, "runs": runs, "log": log, "env": env, "dicts": dicts}
