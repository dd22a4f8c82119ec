"""Tell someone (issue #19 §5): the automation made by `python -m flows.automations` notifies a
webhook when a deployment run fails or crashes. Real Prefect server (its triggers and actions
services evaluate the automation), real process worker, real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from http_server import FileServer
from prefect_server import PrefectServer, wait_for

from flows.automations import AUTOMATION_NAME, BLOCK_NAME

pytestmark = pytest.mark.e2e

POOL = "train-cats-local"
# Loaded 2-core machine: a flow-run process takes seconds to import torch; the automation then
# goes through the server's event pipeline, triggers and actions services.
TIMEOUT = 180
SAVE_SECRET = "from prefect.blocks.system import Secret; Secret(value='x').save('not-a-notifier')"


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records the JSON body of every POST."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/train-cats-alerts"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def about(self, flow_run: dict) -> list[dict]:
        return [b for b in self.bodies if flow_run["id"] in b["body"]]


def _start_run(server: PrefectServer, deployment: dict, parameters: dict) -> dict:
    return server.post(
        f"deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
    )


def _state(server: PrefectServer, flow_run: dict, *types: str) -> dict | None:
    current = server.get(f"flow_runs/{flow_run['id']}")
    return current if current["state_type"] in types else None


def _wait_until(server: PrefectServer, flow_run: dict, state_type: str) -> dict:
    """The flow run once it is in `state_type` (RUNNING: and its process id is recorded)."""

    def reached() -> dict | None:
        run = _state(server, flow_run, state_type)
        return run if run and (state_type != "RUNNING" or run["infrastructure_pid"]) else None

    return wait_for(reached, TIMEOUT, what=f"{state_type}; worker log:\n{server.log('worker')}")


def _check_notification(hook: WebhookReceiver, flow_run: dict, state: str) -> None:
    (note,) = hook.about(flow_run)  # exactly one, though the command ran twice
    print(f"notification for {flow_run['name']}: {note}")
    assert note["subject"] == f"train-cats/dit: run {flow_run['name']} {state}"
    assert f"Flow run: {flow_run['name']} ({flow_run['id']})" in note["body"]
    assert "Deployment: train-cats/dit" in note["body"]
    assert f"State: {state}" in note["body"]
    assert f"/runs/flow-run/{flow_run['id']}" in note["body"]  # the link to the run in the UI


def test_failed_and_crashed_deployment_runs_notify_the_webhook(tmp_path):
    t0 = time.monotonic()
    with (
        WebhookReceiver() as hook,
        FileServer() as files,
        PrefectServer(tmp_path) as server,
    ):
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("--no-prompt", "deploy", "--name", "dit")
        # The documented command, twice: the second run updates, it adds nothing.
        command = [sys.executable, "-m", "flows.automations", "--webhook-url", hook.url]
        first = server.run(command).stdout
        again = server.run(command).stdout
        assert first == again and AUTOMATION_NAME in first, (first, again)
        # Without options it uses the block saved above; still the same automation.
        assert server.run([sys.executable, "-m", "flows.automations"]).stdout == first
        (automation,) = server.post("automations/filter", {})
        assert automation["name"] == AUTOMATION_NAME and automation["enabled"]
        blocks = server.post("block_documents/filter", {})
        assert [b["name"] for b in blocks if not b["is_anonymous"]] == [BLOCK_NAME]
        # A block that is missing, or that cannot notify, is refused, naming it.
        server.run([sys.executable, "-c", SAVE_SECRET])
        for block, error in [
            ("slack-webhook/train-cats-alerts", "no block 'slack-webhook/train-cats-alerts'"),
            ("secret/not-a-notifier", "cannot send notifications"),
        ]:
            result = server.run([*command[:3], "--block", block], check=False)
            assert result.returncode == 2 and error in result.stderr, result.stderr
        print(f"server, deploy and automation: {time.monotonic() - t0:.1f} s")

        server.spawn("worker", "worker", "start", "--pool", POOL)
        deployment = server.get("deployments/name/train-cats/dit")

        # 1. Failed: a parameter that passes the schema but not the flow's own validation.
        t1 = time.monotonic()
        failed = _start_run(server, deployment, {"dit": {"preset": "no-such-preset"}})
        _wait_until(server, failed, "FAILED")
        wait_for(lambda: hook.about(failed), TIMEOUT, what="the Failed notification")
        print(f"failed run to notification: {time.monotonic() - t1:.1f} s")

        # 2. Crashed: the flow-run process dies (SIGKILL) while it waits for its dataset.
        t2 = time.monotonic()
        files.stall("/images.tar.gz", seconds=600, times=None)
        dataset = {"source": files.url("/images.tar.gz"), "max_other": 0, "image_sizes": [32]}
        crashed = _start_run(
            server, deployment, {"dataset": dataset, "dit": {"preset": "cpu-tiny"}}
        )
        running = _wait_until(server, crashed, "RUNNING")
        os.kill(int(running["infrastructure_pid"].rsplit(":", 1)[-1]), signal.SIGKILL)
        _wait_until(server, crashed, "CRASHED")
        wait_for(lambda: hook.about(crashed), TIMEOUT, what="the Crashed notification")
        print(f"crashed run to notification: {time.monotonic() - t2:.1f} s")

        time.sleep(3)  # a duplicate would arrive within this
        _check_notification(hook, failed, "Failed")
        _check_notification(hook, crashed, "Crashed")
        assert len(hook.bodies) == 2, hook.bodies
    print(f"whole test: {time.monotonic() - t0:.1f} s")
