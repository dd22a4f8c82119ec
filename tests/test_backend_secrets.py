"""Modal credentials from Prefect Secret blocks reach a worker's flow runs (issue #19 §1), against
a real Prefect server and process worker, both ways docs/operations.md describes:

- the work pool's base job template (`variables.properties.env.default`) references the blocks:
  the worker resolves them at each run, and nothing but the placeholders is stored;
- a deployment's `job_variables.env` references them: `prefect deploy` resolves them then, so the
  value is stored in the deployment (the docs say so; this test shows it).

Then `prefect deployment run` with no parameters: compute.backend=auto sees the credentials in the
flow run's environment and asks Modal whether the app is deployed. The worker has no network to
Modal (MODAL_SERVER_URL is a closed local port), so each run fails on one line within the check's
bound, naming the token id it found: which proves the block's value reached the flow run.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml
from conftest import REPO
from prefect_server import PrefectServer, free_port, wait_for

from tasks.adapters.modal_access import APP_CHECK_TIMEOUT_S

pytestmark = pytest.mark.e2e

POOL = "train-cats-local"
SECRETS = {  # block name -> value
    "modal-token-id": "ak-from-the-pool",
    "modal-token-secret": "as-from-the-pool",
    "dit-modal-token-id": "ak-from-the-deployment",
    "dit-modal-token-secret": "as-from-the-deployment",
}
SAVE_SECRETS = (
    "import json, sys; from prefect.blocks.system import Secret\n"
    "for name, value in json.loads(sys.argv[1]).items(): Secret(value=value).save(name)"
)


def _ref(block: str) -> str:
    return "{{ prefect.blocks.secret." + block + " }}"


def _flow_run(server: PrefectServer, deployment: str) -> dict:
    """Start a run of train-cats/<deployment> with no parameters, as a user would."""
    server.cli("deployment", "run", f"train-cats/{deployment}")
    dep = server.get(f"deployments/name/train-cats/{deployment}")
    (run,) = server.post(
        "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}
    )
    return run


def _final(server: PrefectServer, run_id: str) -> dict | None:
    run = server.get(f"flow_runs/{run_id}")
    return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None


def test_secret_blocks_give_a_worker_s_flow_runs_their_modal_credentials(tmp_path):
    env = {
        "TRAIN_CATS_DATA_DIR": str(tmp_path / "data"),
        "TRAIN_CATS_RUNS_DIR": str(tmp_path / "runs"),
        "MODAL_SERVER_URL": f"http://127.0.0.1:{free_port()}",  # Modal unreachable, as offline
        "MODAL_CONFIG_PATH": str(tmp_path / "absent.toml"),  # and no ~/.modal.toml
    }
    t0 = time.monotonic()
    with PrefectServer(tmp_path, env) as server:
        for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):  # the worker's own: none
            server.env.pop(name, None)
        server.run([sys.executable, "-c", SAVE_SECRETS, json.dumps(SECRETS)])

        # The pool: the default process template with the blocks as its env's default.
        template_file = tmp_path / "pool.json"
        server.cli("work-pool", "get-default-base-job-template", "--type", "process",
                   "--file", str(template_file))  # fmt: skip
        template = json.loads(template_file.read_text())
        template["variables"]["properties"]["env"]["default"] = {
            "MODAL_TOKEN_ID": _ref("modal-token-id"),
            "MODAL_TOKEN_SECRET": _ref("modal-token-secret"),
        }
        template_file.write_text(json.dumps(template))
        server.cli("work-pool", "create", POOL, "--type", "process",
                   "--base-job-template", str(template_file))  # fmt: skip

        # The deployments as in prefect.yaml; `classifier` also names its own blocks.
        config = yaml.safe_load((REPO / "prefect.yaml").read_text())
        (classifier,) = [d for d in config["deployments"] if d["name"] == "classifier"]
        classifier["work_pool"] = {
            **classifier["work_pool"],
            "job_variables": {"env": {
                **classifier["work_pool"]["job_variables"]["env"],
                "MODAL_TOKEN_ID": _ref("dit-modal-token-id"),
                "MODAL_TOKEN_SECRET": _ref("dit-modal-token-secret"),
            }},
        }  # fmt: skip
        prefect_file = tmp_path / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))

        # Where the values live: the pool keeps the placeholders; a deployment's env holds the
        # value `prefect deploy` resolved; a deployment without its own refs holds none.
        pool = server.get(f"work_pools/{POOL}")
        assert pool["base_job_template"]["variables"]["properties"]["env"]["default"][
            "MODAL_TOKEN_ID"] == _ref("modal-token-id")  # fmt: skip
        stored = server.get("deployments/name/train-cats/classifier")["job_variables"]["env"]
        assert stored["MODAL_TOKEN_ID"] == "ak-from-the-deployment"
        dit_env = server.get("deployments/name/train-cats/dit")["job_variables"]["env"]
        assert "MODAL_TOKEN_ID" not in dit_env

        server.spawn("worker", "worker", "start", "--pool", POOL)
        t1 = time.monotonic()
        runs = {name: _flow_run(server, name) for name in ("dit", "classifier")}
        final = {
            name: wait_for(lambda r=run: _final(server, r["id"]), 300,
                           what=f"the {name} run; worker log:\n{server.log('worker')}")
            for name, run in runs.items()
        }  # fmt: skip
        elapsed = time.monotonic() - t1
        print(f"server, pool and deploy: {t1 - t0:.1f} s; both runs ended {elapsed:.1f} s later")
        for name, token in (("dit", "ak-from-the-pool"), ("classifier", "ak-from-the-deployment")):
            run, state = final[name], final[name]["state"]
            message = state["message"] or ""
            print(f"{name}: {state['type']}: {message}")
            assert run["parameters"]["compute"] == {"backend": "auto"}
            assert state["type"] == "FAILED", (name, state)
            assert f"Modal credentials from the environment (MODAL_TOKEN_ID={token}," in message
            assert f"did not answer within {APP_CHECK_TIMEOUT_S:g} s (offline?)" in message
            assert "as-from" not in message  # the secret itself is never shown
            tasks = server.post("task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
            assert tasks == [], f"{name}: work started before the backend was chosen"
