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
from datetime import datetime
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


SOURCE = {
    "checksum": "sha256:5e323a073ce0e71fda305108a81efefa0abf20074e647cb6143273b4221b4229",
    "labels": "breed",
    "image_sizes": [32],
}


def _run(stack, deployment: str, **params) -> dict:
    """`prefect deployment run train-cats/<deployment> --watch` with `params` over the
    deployment's own; returns the flow run as the API reports it."""
    dataset = {**SOURCE, **params.pop("dataset", {}), "source": stack["files"].url("/images.tar.gz")}
    params = {"dataset": dataset, **params}
    result = subprocess.run(
        [*PREFECT, "deployment", "run", f"train-cats/{deployment}", "--params", json.dumps(params),
         "--watch", "--watch-interval", "2", "--watch-timeout", "240"],
        cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    runs = _post(stack, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    assert result.returncode == 0, (
        f"{result.stdout}\n{result.stderr}\nworker log:\n"
        + (stack["logs"] / "worker.log").read_text()[-6000:]
    )
    return runs[0]


def _run_dit(stack, **params) -> dict:
    """The main job on the 12 cat breeds (no 'other'), judged by the classifier champion."""
    # 120 steps, not cpu-tiny's 30: at 30 the samples were still close enough to noise that a
    # 1-step model tied them on some CPUs (machine J), and the challenger below must be worse.
    tiny = {"preset": "cpu-tiny", "overrides": {"steps": 120}}
    params = {"dit": tiny, "dataset": {"max_other": 0}, **params}
    return _run(stack, "dit", evaluation={"enabled": True, "samples_per_class": 2}, **params)


def _champion(stack, deployment: str, kind: str) -> dict:
    path = stack["root"] / "runs" / "champions" / deployment / f"{kind}.json"
    return json.loads(path.read_text())


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
        for name in ("ensure_dataset · breed", "train_dit · cpu-tiny", "evaluate · classifier + dit"):
            page.get_by_text(name).first.wait_for(timeout=30_000)
        page.screenshot(path=shots[0], full_page=True)
        page.get_by_text("Artifacts", exact=True).first.click()
        for key in ("dit-metrics", "dit-files", "dataset-summary", "promotion", "change-check"):
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
    # The judge first: the classifier deployment's champion covers the DiT's 12 breeds.
    t0 = time.monotonic()
    judge_run = _run(
        stack, "classifier", dataset={**SOURCE, "max_other": 24},
        classifier={"preset": "cpu-tiny"},
    )  # fmt: skip
    assert (judge_run["state_type"], judge_run["state_name"]) == ("COMPLETED", "Promoted")
    judge = _champion(stack, "classifier", "classifier")
    print(f"classifier deployment run: {time.monotonic() - t0:.1f} s")

    t0 = time.monotonic()
    first = _run_dit(stack)
    assert (first["state_type"], first["state_name"]) == ("COMPLETED", "Promoted")
    assert stack["files"].count("/images.tar.gz") >= 1
    print(f"first dit deployment run: {time.monotonic() - t0:.1f} s")
    champion = _champion(stack, "dit", "dit")
    assert champion["run_name"].endswith("/dit") and champion["flow_run_id"] == first["id"]
    assert champion["metrics"], "a judged DiT has generator metrics"

    flow_filter = {"flow_runs": {"id": {"any_": [first["id"]]}}}
    tasks = _post(stack, "task_runs/filter", flow_filter)
    names = sorted(t["name"] for t in tasks)
    assert {"check_for_changes", "ensure_dataset", "train_dit", "evaluate", "promote"} == {
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
    assert {"dit-metrics", "dit-files", "promotion", "change-check"} <= keys, keys
    (report,) = [
        a for a in artifacts if a["type"] == "markdown" and (a["key"] or "").endswith("eval-report")
    ]
    assert "data:image/png;base64," in report["data"]
    assert judge["run_name"] in report["data"], "the report names its judge"

    exports = list((stack["root"] / "runs").glob("*/dit/model.safetensors"))
    assert len(exports) == 1, exports
    dit_dir = exports[0].parent
    assert exports[0].stat().st_size > 0
    assert (dit_dir / "config.json").is_file()
    assert list((dit_dir / "checkpoints").iterdir())
    reports = list((stack["root"] / "runs").glob("*/report/report.json"))
    assert reports and json.loads(reports[0].read_text())
    assert (reports[0].parent / "report.md").is_file()

    # Nothing changed: skipped in seconds, one conditional HEAD (304) and no GET of the archive.
    gets, heads = stack["files"].count("/images.tar.gz"), len(stack["files"].requests)
    second = _run_dit(stack)
    assert (second["state_type"], second["state_name"]) == ("COMPLETED", "Unchanged")
    took = (_iso(second["end_time"]) - _iso(second["start_time"])).total_seconds()
    print(f"unchanged run: {took:.1f} s from start to end")
    assert took < 60  # seconds of imports and one HEAD; a retraining takes minutes here
    assert stack["files"].count("/images.tar.gz") == gets == 1
    assert [r.status for r in stack["files"].requests[heads:]] == [304]
    assert _champion(stack, "dit", "dit") == champion

    # Forced, with a config that makes the model worse (1 step): kept as a challenger.
    third = _run_dit(stack, force=True, dit={"preset": "cpu-tiny", "overrides": {"steps": 1}})
    assert (third["state_type"], third["state_name"]) == ("COMPLETED", "Challenger")
    assert "regressed on generator." in third["state"]["message"]
    assert _champion(stack, "dit", "dit") == champion

    # The Prefect UI, in headless Chromium: the run's task runs and artifacts are on its page, and
    # the evaluation report's inline pictures render.
    shots = _check_ui(f"http://127.0.0.1:{stack['port']}", first["id"], report["id"])
    print("UI screenshots:", *map(str, shots))


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_missing_chromium_fails_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        require_chromium()
