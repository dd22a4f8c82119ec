"""A real HTTP file server on 127.0.0.1 for tests, with request counting and fault injection.

    with FileServer(tmp_path) as server:          # serves the files under tmp_path
        server.add("/mini.tar.gz", OXFORD_MINI)   # or any file, without copying it
        server.fail("/mini.tar.gz", 503, times=2) # the next two GETs answer 503
        server.drop("/mini.tar.gz", after=1000)   # then one body is cut after 1000 bytes
        url = server.url("/mini.tar.gz")
        ...
        assert server.count("/mini.tar.gz") == 4
        assert server.requests[-1].headers.get("Range") == "bytes=1000-"

Faults are queued per path and consumed one request at a time, in the order they were added;
a fault with `times=None` never runs out. GET honours `Range: bytes=a-` and `bytes=a-b` (206,
or 416 past the end). Files carry an ETag and Last-Modified; `If-None-Match` answers 304. HTTP/1.0, so every request is a new connection, as after a real drop.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Request:
    """One request as the server saw it; `status` is what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class _Fault:
    kind: str  # "status" | "drop" | "stall"
    times: int | None
    status: int = 0
    after: int = 0
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class FileServer:
    """Serve files on 127.0.0.1 on a free port, from `root` and from files added by path."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.requests: list[Request] = []
        # False makes GET ignore Range and answer 200 with the whole file, as some servers do
        # (Python's own http.server among them).
        self.ranges = True
        self._files: dict[str, Path] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content and faults ------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, file: Path) -> str:
        """Serve `file` at `path`; returns its URL."""
        self._files["/" + path.lstrip("/")] = Path(file)
        return self.url(path)

    def fail(
        self, path: str, status: int, times: int | None = 1, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next `times` requests for `path` with `status` and a short body."""
        self._queue(path, _Fault("status", times, status=status, headers=dict(headers or {})))

    def drop(self, path: str, after: int, times: int | None = 1) -> None:
        """Send the full headers, then close the connection after `after` body bytes."""
        self._queue(path, _Fault("drop", times, after=after))

    def stall(self, path: str, seconds: float, times: int | None = 1) -> None:
        """Wait `seconds` before answering (to trigger client timeouts or overlap callers)."""
        self._queue(path, _Fault("stall", times, seconds=seconds))

    # -- observations ------------------------------------------------------------------------
    def count(self, path: str | None = None, method: str = "GET") -> int:
        """Requests received for `path` (all paths if None) with `method`."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == method and (path is None or r.path == "/" + path.lstrip("/"))
            )

    # -- internals ---------------------------------------------------------------------------
    def _queue(self, path: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault("/" + path.lstrip("/"), []).append(fault)

    def _next_fault(self, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(path, [])
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault

    def _resolve(self, path: str) -> Path | None:
        if path in self._files:
            return self._files[path]
        if self.root is None:
            return None
        candidate = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            fault = server._next_fault(path)
            if fault is not None and fault.kind == "stall":
                time.sleep(fault.seconds)
                fault = None
            if fault is not None and fault.kind == "status":
                return self._answer(path, fault.status, b"injected fault\n", fault.headers)
            file = server._resolve(path)
            if file is None:
                return self._answer(path, 404, b"not found\n")
            stat = file.stat()
            size = stat.st_size
            # Validators as real servers give them, so conditional requests can be tested.
            validators = {
                "ETag": f'"{size:x}-{stat.st_mtime_ns:x}"',
                "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            }
            if self.headers.get("If-None-Match") == validators["ETag"]:
                return self._answer(path, 304, b"", validators)
            start, end, status = 0, size - 1, 200
            match = _RANGE.match(self.headers.get("Range", ""))
            if match and server.ranges:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
                if start >= size or start > end:
                    return self._answer(path, 416, b"", {"Content-Range": f"bytes */{size}"})
                status = 206
            length = end - start + 1
            # Recorded before answering, so a client that has its answer sees it counted.
            server._record(Request(self.command, path, dict(self.headers), status))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            for name, value in validators.items():
                self.send_header(name, value)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            limit = fault.after if fault is not None and fault.kind == "drop" else length
            self._send_bytes(file, start, min(limit, length))
            if limit < length:
                # Cut the connection mid-body: the client sees fewer bytes than Content-Length.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        def _send_bytes(self, file: Path, start: int, count: int) -> None:
            with open(file, "rb") as handle:
                handle.seek(start)
                while count > 0:
                    chunk = handle.read(min(_CHUNK, count))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    count -= len(chunk)

        def _answer(
            self, path: str, status: int, payload: bytes, headers: dict[str, str] | None = None
        ) -> None:
            server._record(Request(self.command, path, dict(self.headers), status))
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if status != 304:  # a 304 has no body, so no length
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
