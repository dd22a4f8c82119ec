"""Tell someone: the Automation that sends a notification when a run of one of the `train-cats`
flow's deployments fails or crashes.

Create it, or bring it up to date, against the server in PREFECT_API_URL. Running it again
updates the same automation and block; it never adds a second one.

    python -m flows.automations --webhook-url https://hooks.example.org/train-cats
    python -m flows.automations --block slack-webhook/train-cats-alerts

`--webhook-url` saves a Custom Webhook block (`custom-webhook/train-cats-alerts`) that POSTs
`{"subject": ..., "body": ...}` as JSON. `--block` uses a notification block saved beforehand in
the UI (Blocks -> +) or in Python, e.g. Slack:
`SlackWebhook(url="https://hooks.slack.com/services/...").save("train-cats-alerts")`, or e-mail
through `SendgridEmail`. Without either option, the saved `custom-webhook/train-cats-alerts`.

The trigger matches the events `prefect.flow-run.Failed` and `prefect.flow-run.Crashed` whose
flow is `train-cats` and that come from a deployment (any of prefect.yaml's, and any added later);
a run started by hand in-process (`train-cats ...` without a deployment) does not notify. The
server's triggers and actions services evaluate it (both on by default in `prefect server start`).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from uuid import UUID

import httpx
from prefect import get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from data.errors import OneLineParser, print_error

FLOW_NAME = "train-cats"
AUTOMATION_NAME = "train-cats: failed or crashed runs"
BLOCK_NAME = "train-cats-alerts"
DEFAULT_BLOCK = f"custom-webhook/{BLOCK_NAME}"
STATES = ("Failed", "Crashed")

# Jinja, rendered by the server when the automation fires; `flow_run`, `deployment` and `flow`
# are read from the API for the run that triggered it.
SUBJECT = "train-cats/{{ deployment.name }}: run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = """\
Flow run: {{ flow_run.name }} ({{ flow_run.id }})
Deployment: {{ flow.name }}/{{ deployment.name }}
State: {{ flow_run.state.name }}
Message: {{ flow_run.state.message }}
Parameters: {{ flow_run.parameters }}
Started: {{ flow_run.start_time }}
See: {{ flow_run|ui_url }}"""


def automation(block_document_id: UUID) -> AutomationCore:
    """The automation, as it should be on the server."""
    return AutomationCore(
        name=AUTOMATION_NAME,
        description="Notifies when a run of a train-cats deployment fails or crashes "
        "(flows/automations.py).",
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{state}" for state in STATES},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # Every spec must match one of the event's related resources: the flow is ours and
            # the run came from a deployment.
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": "prefect.deployment.*",
                },
            ],
            for_each={"prefect.resource.id"},  # one notification per flow run
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def save_webhook_block(url: str) -> UUID:
    """Save (or overwrite) `custom-webhook/train-cats-alerts`, posting JSON to `url`."""
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    )
    return block.save(BLOCK_NAME, overwrite=True)


def notification_block_id(slug: str) -> UUID:
    """The id of the saved block `<block type>/<name>`; it must be able to notify."""
    block_type, _, name = slug.partition("/")
    if not name:
        raise ValueError(f"--block {slug!r}: expected <block type>/<name>, e.g. {DEFAULT_BLOCK}")
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, block_type, include_secrets=False)
        except ObjectNotFound:
            raise ValueError(
                f"no block {slug!r} on the server: save one first, or pass --webhook-url"
            ) from None
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise ValueError(f"block {slug!r} cannot send notifications (a {block_type} block)")
    return document.id


def apply(block_document_id: UUID) -> UUID:
    """Create the automation, or update it in place when one of that name exists (extra copies,
    e.g. from `prefect automation create` run twice, are deleted). Returns its id."""
    wanted = automation(block_document_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if not existing:
            return client.create_automation(wanted)
        keep, *extra = existing
        client.update_automation(keep.id, wanted)
        for duplicate in extra:
            client.delete_automation(duplicate.id)
        return keep.id


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m flows.automations",
        description="Create or update the automation that notifies on failed or crashed runs "
        "of the train-cats deployments (server: PREFECT_API_URL).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--webhook-url", help=f"save a Custom Webhook block {DEFAULT_BLOCK} posting to this URL"
    )
    where.add_argument(
        "--block",
        default=DEFAULT_BLOCK,
        help="a saved notification block, <block type>/<name>, e.g. slack-webhook/train-cats-alerts"
        f" (default: {DEFAULT_BLOCK})",
    )
    parser.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        if args.webhook_url:
            block_id, block = save_webhook_block(args.webhook_url), DEFAULT_BLOCK
        else:
            block_id, block = notification_block_id(args.block), args.block
        automation_id = apply(block_id)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:  # no server there (or it failed): one line, the way out
        print_error(
            f"python -m flows.automations: error: the Prefect API at {PREFECT_API_URL.value()} "
            "did not answer (start `prefect server start` and set PREFECT_API_URL): ",
            exc,
            args.verbose,
        )
        return 1
    print(f"automation {AUTOMATION_NAME!r} ({automation_id}) notifies through block {block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
