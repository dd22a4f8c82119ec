"""A real Prefect server on 127.0.0.1 for tests, with the `prefect` CLI and processes pointed at it.

    with PrefectServer(tmp_path, {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}) as server:
        server.cli("work-pool", "create", "train-cats-local", "--type", "process")
        server.cli("--no-prompt", "deploy", "--all")     # from the repository root
        worker = server.spawn("worker", "worker", "start", "--pool", "train-cats-local")
        server.post("flow_runs/filter", {...})

Every process gets its own PREFECT_HOME under `root` and logs to `root/logs/<name>.log`
(`server.log(name)` reads the tail). Processes are stopped in reverse order on exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Call `check()` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class PrefectServer:
    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.root / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            **(env or {}),
        }
        self.logs = self.root / "logs"
        self._procs: list[tuple[subprocess.Popen, Any]] = []

    def __enter__(self) -> PrefectServer:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
            wait_for(self._healthy, 120, what=f"the server; log:\n{self.log('server')}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc, out in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()
        self._procs.clear()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def spawn(self, name: str, *args: str, argv: list[str] | None = None) -> subprocess.Popen:
        """Start `prefect <args>` (or `argv`) in the repository root, logging to logs/<name>.log."""
        out = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 - closed in __exit__
        proc = subprocess.Popen(
            argv or [*PREFECT, *args], cwd=REPO, env=self.env, stdout=out, stderr=out
        )
        self._procs.append((proc, out))
        return proc

    def run(
        self, argv: list[str], timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run `argv` to the end in the repository root; with `check`, fail with its output
        unless it exits 0."""
        result = subprocess.run(
            argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
        return result

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return self.run([*PREFECT, *args], timeout=timeout)

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: dict) -> Any:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        # A busy SQLite answers 503 ("database is locked"); Prefect's own client retries those.
        for attempt in range(6):
            response = httpx.request(method, f"{self.api}/{path}", json=body, timeout=30)
            if response.status_code != 503:
                break
            time.sleep(2**attempt / 2)
        response.raise_for_status()
        return response.json()
