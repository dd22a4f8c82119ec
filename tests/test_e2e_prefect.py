"""End to end, as a user meets it: a real Prefect server, `prefect deploy --all`, a process worker,
`prefect deployment run train-cats/dit --watch`, then the Prefect UI in headless Chromium.

The dataset is the shared oxford-pets-mini archive served by a real HTTP server on 127.0.0.1; the
storage roots come from the worker's environment and point into this test's temporary folder.
The evaluation's markdown artifact (sample grid and confusion matrix inline as `data:` URIs) is
opened on its own page to check that the images really decode. The screenshots are saved under
tests/output/ (their paths are printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import OXFORD_MINI, REPO
from http_server import FileServer
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.e2e

POOL = "train-cats-local"
PREFECT = [sys.executable, "-m", "prefect"]
OUTPUT = REPO / "tests" / "output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def require_chromium() -> None:
    """Fail (never skip) at once, before any server starts, when the browser is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM} missing): install it with "
            "`sudo apt-get install -y chromium` (as root, `bash setup.sh --dev` does it)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_datasets):
    """Prefect server + work pool + deployments + process worker + dataset server."""
    require_chromium()
    root = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_UI_API_URL": api,
        "TRAIN_CATS_DATA_DIR": str(root / "data"),
        "TRAIN_CATS_RUNS_DIR": str(root / "runs"),
    }
    logs = root / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen([*PREFECT, *args], cwd=REPO, env=env, stdout=out, stderr=out)
        procs.append((proc, out))
        return proc

    files = FileServer(root / "www")
    files.__enter__()
    files.add("/images.tar.gz", OXFORD_MINI)
    try:
        start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (logs / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        _cli(env, "work-pool", "create", POOL, "--type", "process")
        _cli(env, "--no-prompt", "deploy", "--all")
        start("worker", "worker", "start", "--pool", POOL)
        yield {"env": env, "api": api, "port": port, "files": files, "root": root, "logs": logs}
    finally:
        for proc, out in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()
        files.__exit__(None, None, None)


def _run_dit(stack) -> dict:
    params = {
        "dataset": {
            "source": stack["files"].url("/images.tar.gz"),
            "checksum": "sha256:5e323a073ce0e71fda305108a81efefa0abf20074e647cb6143273b4221b4229",
            "labels": "breed",
            "max_other": 24,
            "image_sizes": [32],
        },
        "dit": {"preset": "cpu-tiny"},
        "evaluation": {"enabled": True, "samples_per_class": 2},
    }
    result = subprocess.run(
        [*PREFECT, "deployment", "run", "train-cats/dit", "--params", json.dumps(params),
         "--watch", "--watch-interval", "2", "--watch-timeout", "240"],
        cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    runs = _post(stack, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    assert result.returncode == 0, (
        f"{result.stdout}\n{result.stderr}\nworker log:\n"
        + (stack["logs"] / "worker.log").read_text()[-6000:]
    )
    return runs[0]


def _post(stack, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{stack['api']}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _check_ui(base: str, flow_run_id: str, report_id: str) -> list[Path]:
    """Open the flow-run page, click its Task Runs and Artifacts tabs, assert what they list; then
    open the evaluation's markdown artifact and assert its inline images are decoded."""
    OUTPUT.mkdir(exist_ok=True)
    shots = [
        OUTPUT / "e2e-flow-run-task-runs.png",
        OUTPUT / "e2e-flow-run-artifacts.png",
        OUTPUT / "e2e-evaluation-report.png",
    ]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1100},
        )
        page = browser.new_page()
        page.goto(f"{base}/runs/flow-run/{flow_run_id}")
        page.get_by_text("Task Runs", exact=True).first.click()
        for name in ("ensure_dataset · breed", "train_dit · cpu-tiny", "evaluate · dit"):
            page.get_by_text(name).first.wait_for(timeout=30_000)
        page.screenshot(path=shots[0], full_page=True)
        page.get_by_text("Artifacts", exact=True).first.click()
        for key in ("dit-metrics", "dit-files", "dataset-summary"):
            page.get_by_text(key).first.wait_for(timeout=30_000)
        page.screenshot(path=shots[1], full_page=True)
        page.goto(f"{base}/artifacts/artifact/{report_id}")
        image = page.locator('img[src^="data:image/png;base64,"]').first
        image.wait_for(timeout=30_000)
        # naturalWidth > 0 only once the browser has decoded the picture, not for a broken image.
        page.wait_for_function(
            "() => [...document.querySelectorAll('img[src^=\"data:image/png\"]')]"
            ".some(img => img.complete && img.naturalWidth > 0)",
            timeout=30_000,
        )
        decoded = page.eval_on_selector_all(
            'img[src^="data:image/png"]', "imgs => imgs.map(img => img.naturalWidth)"
        )
        image.scroll_into_view_if_needed()  # the page scrolls inside a container, not the body
        page.screenshot(path=shots[2], full_page=True)
        browser.close()
    assert decoded and all(width > 0 for width in decoded), decoded
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    return shots


def test_deployment_runs_end_to_end_and_the_ui_shows_it(stack):
    t0 = time.monotonic()
    first = _run_dit(stack)
    assert first["state_type"] == "COMPLETED"
    assert stack["files"].count("/images.tar.gz") >= 1
    print(f"first deployment run: {time.monotonic() - t0:.1f} s")

    flow_filter = {"flow_runs": {"id": {"any_": [first["id"]]}}}
    tasks = _post(stack, "task_runs/filter", flow_filter)
    names = sorted(t["name"] for t in tasks)
    assert {"ensure_dataset", "train_dit", "evaluate"} == {
        re.match("[a-z_]+", n)[0].rstrip("_") for n in names
    }, names
    assert all(t["state_type"] == "COMPLETED" for t in tasks), names
    assert any("cpu-tiny" in n for n in names), names  # readable names: model · preset

    artifacts = _post(
        stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}}
    )
    keys = {a["key"] for a in artifacts if a["key"]}
    types = {a["type"] for a in artifacts}
    assert "progress" in types and "table" in types and "markdown" in types, types
    assert {"dit-metrics", "dit-files"} <= keys, keys
    (report,) = [
        a for a in artifacts if a["type"] == "markdown" and (a["key"] or "").endswith("eval-report")
    ]
    assert "data:image/png;base64," in report["data"]

    exports = list((stack["root"] / "runs").glob("*/dit/model.safetensors"))
    assert len(exports) == 1, exports
    dit_dir = exports[0].parent
    assert exports[0].stat().st_size > 0
    assert (dit_dir / "config.json").is_file()
    assert list((dit_dir / "checkpoints").iterdir())
    reports = list((stack["root"] / "runs").glob("*/report/report.json"))
    assert reports and json.loads(reports[0].read_text())
    assert (reports[0].parent / "report.md").is_file()

    # Second run: the published dataset version is reused, the archive is not fetched again.
    before = stack["files"].count("/images.tar.gz")
    second = _run_dit(stack)
    assert second["state_type"] == "COMPLETED"
    assert stack["files"].count("/images.tar.gz") == before == 1

    # The Prefect UI, in headless Chromium: the run's task runs and artifacts are on its page, and
    # the evaluation report's inline pictures render.
    shots = _check_ui(f"http://127.0.0.1:{stack['port']}", first["id"], report["id"])
    print("UI screenshots:", *map(str, shots))


def test_a_missing_chromium_fails_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        require_chromium()
