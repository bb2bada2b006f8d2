"""Automations, kept as code: an alarmed night, a failed run or a missing nightly run sends a notification.

`make serve` applies them; against any other server run ``anomaly alerts`` with PREFECT_API_URL set.
Applying is idempotent: each automation is matched by name and updated in place (a paused one stays
paused), never duplicated.
Notifications go through a Prefect webhook block whose URL comes from ANOMALY_ALERT_WEBHOOK_URL and
whose JSON body, ``{"text": ...}``, is what a Slack incoming webhook expects. Without that variable the
automations are still created, with an action that does nothing, and applying says so.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any
from uuid import UUID

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.actions import DoNothing, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.settings import PREFECT_API_URL

from data.errors import ParameterError
from tasks.events import NIGHT_ALARM

WEBHOOK_ENV = "ANOMALY_ALERT_WEBHOOK_URL"
WEBHOOK_BLOCK = "anomaly-alert-webhook"
SCORING_DEPLOYMENT = "nightly-scoring"
RETRAINING_DEPLOYMENT = "weekly-retraining"
EVALUATION_DEPLOYMENT = "nightly-evaluation"
BACKFILL_DEPLOYMENT = "backfill"
# The nightly schedule plus two hours of slack for a slow or queued run.
MISSING_RUN_WINDOW = dt.timedelta(hours=26)
TAG = "anomaly"

ALARM_NAME = "anomaly: night alarmed"
FAILURE_NAME = "anomaly: scoring, retraining or evaluation run failed"
MISSING_NAME = "anomaly: no completed nightly scoring in 26 hours"
# Names earlier definitions had: applying removes them, so that a renamed automation does not notify twice.
RETIRED_NAMES = ("anomaly: scoring or retraining run failed",)

ALARM_SUBJECT = "Anomaly alarm for {{ event.payload.date }}"
ALARM_BODY = (
    "Date: {{ event.payload.date }}\n"
    "Verdict: ALARM ({{ event.payload.alarm_reasons | join(', ') }})\n"
    "Flag rate: {{ event.payload.flag_rate }} "
    "(all-normal band {{ event.payload.flag_rate_band }}, verdict {{ event.payload.flag_rate_verdict }})\n"
    "Rows scored: {{ event.payload.rows_scored }}, flagged: {{ event.payload.rows_flagged }}, "
    "batches failed: {{ event.payload.batches_failed }}\n"
    "Model: {{ event.payload.model_version }}; workspace: {{ event.payload.workspace }}\n"
    "Report: {{ event.payload.report }}\n"
    "Run: {{ flow_run|ui_url }}"
)
FAILURE_SUBJECT = "Anomaly job {{ flow_run.name }} ended {{ flow_run.state.name }}"
FAILURE_BODY = """Date: {{ flow_run.parameters.run_date or flow_run.expected_start_time }}
Verdict: {{ flow_run.state.name }} ({{ deployment.name }})
Message: {{ flow_run.state.message }}
Run: {{ flow_run|ui_url }}"""
MISSING_SUBJECT = "Anomaly scoring did not complete in 26 hours"
MISSING_BODY = """Date: {{ firing.triggered }}
Verdict: MISSING - no nightly-scoring run completed in the last 26 hours
Check the worker (make status) and the deployment's schedule; a run that never started sends no failure.
Automation: {{ automation|ui_url }}"""


def _deployment_runs(*deployments: str) -> dict[str, Any]:
    return {
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": {"prefect.resource.role": "deployment", "prefect.resource.name": list(deployments)},
    }


def automation_definitions(block_id: UUID | None) -> list[AutomationCore]:
    """Return the three automations, each notifying through the webhook block (or doing nothing without one)."""

    def notify(subject: str, body: str) -> list[Any]:
        return [SendNotification(block_document_id=block_id, subject=subject, body=body)] if block_id else [DoNothing()]

    where = (
        f" Notifications go to the {WEBHOOK_BLOCK} block."
        if block_id
        else f" No notification is sent: set {WEBHOOK_ENV} and apply again."
    )
    return [
        AutomationCore(
            name=ALARM_NAME,
            description=(
                "A scored night is abnormal: flag rate outside its all-normal band, drifted inputs or scores, "
                "or failed batches."
            )
            + where,
            tags=[TAG],
            trigger=EventTrigger(
                expect={NIGHT_ALARM},
                match={"prefect.resource.id": "anomaly.night.*"},
                posture=Posture.Reactive,
                threshold=1,
                within=dt.timedelta(0),
            ),
            actions=notify(ALARM_SUBJECT, ALARM_BODY),
        ),
        AutomationCore(
            name=FAILURE_NAME,
            description=(
                f"A {SCORING_DEPLOYMENT}, {RETRAINING_DEPLOYMENT}, {EVALUATION_DEPLOYMENT} or {BACKFILL_DEPLOYMENT} "
                "run ended Failed or Crashed."
            )
            + where,
            tags=[TAG],
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                **_deployment_runs(
                    SCORING_DEPLOYMENT, RETRAINING_DEPLOYMENT, EVALUATION_DEPLOYMENT, BACKFILL_DEPLOYMENT
                ),
                posture=Posture.Reactive,
                threshold=1,
                within=dt.timedelta(0),
            ),
            actions=notify(FAILURE_SUBJECT, FAILURE_BODY),
        ),
        AutomationCore(
            name=MISSING_NAME,
            description=(
                f"No {SCORING_DEPLOYMENT} run reached Completed within {MISSING_RUN_WINDOW}: the worker is down, "
                "the schedule is paused or runs hang."
            )
            + where,
            tags=[TAG],
            trigger=EventTrigger(
                expect={"prefect.flow-run.Completed"},
                **_deployment_runs(SCORING_DEPLOYMENT),
                posture=Posture.Proactive,
                threshold=1,
                within=MISSING_RUN_WINDOW,
            ),
            actions=notify(MISSING_SUBJECT, MISSING_BODY),
        ),
    ]


def save_webhook_block(url: str) -> UUID:
    """Save (or overwrite) the webhook notification block posting to ``url``; return its id.

    The block posts Slack-style ``{"text": ...}`` JSON.
    """
    block = CustomWebhookNotificationBlock(
        name="anomaly-alerts", url=url, method="POST", json_data={"text": "*{{subject}}*\n{{body}}"}
    )
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def apply_automations(webhook_url: str | None = None) -> dict[str, Any]:
    """Create or update the automations (and the webhook block when a URL is given) on the current Prefect server."""
    if not PREFECT_API_URL.value():
        # Without it Prefect would start a throw-away server and the automations would vanish with it.
        raise ParameterError(
            "PREFECT_API_URL is not set: point it at the Prefect server the automations belong on, "
            "e.g. http://127.0.0.1:4200/api"
        )
    webhook_url = webhook_url if webhook_url is not None else os.environ.get(WEBHOOK_ENV) or None
    block_id = save_webhook_block(webhook_url) if webhook_url else None
    applied = []
    with get_client(sync_client=True) as client:
        for definition in automation_definitions(block_id):
            existing = client.read_automations_by_name(definition.name)
            if existing:
                # A paused automation is a mute someone chose: applying again keeps it paused.
                definition.enabled = existing[0].enabled
                client.update_automation(existing[0].id, definition)
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
                applied.append({"name": definition.name, "id": str(existing[0].id), "action": "updated"})
            else:
                applied.append(
                    {"name": definition.name, "id": str(client.create_automation(definition)), "action": "created"}
                )
        for name in RETIRED_NAMES:
            for retired in client.read_automations_by_name(name):
                client.delete_automation(retired.id)
                applied.append({"name": name, "id": str(retired.id), "action": "deleted"})
        api_url = str(client.api_url)
    return {
        "api_url": api_url,
        "automations": applied,
        "notifications": f"webhook block {WEBHOOK_BLOCK}" if block_id else None,
        "warning": (
            None if block_id else f"{WEBHOOK_ENV} is not set: the automations exist but no notifications will be sent"
        ),
    }
