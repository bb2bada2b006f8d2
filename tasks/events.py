"""Prefect events of both flows, for automations to match: a night scored (and alarmed), a model promoted or refused."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from data.workspace import Workspace

NIGHT_SCORED = "anomaly.night.scored"
NIGHT_ALARM = "anomaly.night.alarm"
MODEL_PROMOTED = "anomaly.model.promoted"
MODEL_REFUSED = "anomaly.model.refused"
NIGHT_PAYLOAD_KEYS = (
    "date",
    "model_version",
    "rows_scored",
    "rows_flagged",
    "flag_rate",
    "expected_flag_rate",
    "flag_rate_band",
    "flag_rate_verdict",
    "alarm",
    "alarm_reasons",
    "batches_scored",
    "batches_failed",
    "report",
)
MODEL_PAYLOAD_KEYS = (
    "model_version",
    "promoted",
    "promotion_refused",
    "preset",
    "threshold",
    "percentile",
    "threshold_warning",
    "training_rows",
    "validation_rows",
    "holdout_recall",
    "report",
)


def workspace_uri(workspace_root: str) -> str:
    """Return the workspace's absolute path or URI, as events name it."""
    return str(Workspace.at(workspace_root).root)


def workspace_resource(workspace_root: str) -> dict[str, str]:
    """Return the related resource naming a workspace, so that automations can match one workspace's events."""
    root = workspace_uri(workspace_root)
    return {
        "prefect.resource.id": f"anomaly.workspace.{root}",
        "prefect.resource.role": "workspace",
        "prefect.resource.name": root,
    }


@task(name="emit-night-events", cache_policy=NO_CACHE)
def emit_night_events(workspace_root: str, outcome: dict[str, Any]) -> list[str]:
    """Emit anomaly.night.scored for a scoring run, and anomaly.night.alarm when its night is alarmed.

    Return the events emitted.
    """
    root = workspace_uri(workspace_root)
    date = str(outcome["date"])
    resource = {
        "prefect.resource.id": f"anomaly.night.{root}.{date}",
        "prefect.resource.name": f"{root.rstrip('/').rsplit('/', 1)[-1]} {date}",
        "anomaly.workspace": root,
        "anomaly.date": date,
    }
    payload = {"workspace": root, **{key: outcome.get(key) for key in NIGHT_PAYLOAD_KEYS}}
    names = [NIGHT_SCORED] + ([NIGHT_ALARM] if outcome.get("alarm") else [])
    for name in names:
        emit_event(name, resource=resource, related=[workspace_resource(root)], payload=payload)
    if outcome.get("alarm"):
        get_run_logger().warning("Night %s is abnormal: %s", date, ", ".join(outcome["alarm_reasons"]))
    return names


@task(name="emit-model-event", cache_policy=NO_CACHE)
def emit_model_event(workspace_root: str, outcome: dict[str, Any]) -> str | None:
    """Emit anomaly.model.promoted, or anomaly.model.refused when the promotion gate refused the new model.

    Return the event emitted.
    """
    root = workspace_uri(workspace_root)
    if outcome["promoted"]:
        name = MODEL_PROMOTED
    elif outcome["promotion_refused"]:
        name = MODEL_REFUSED
    else:  # saved without promotion, as asked: nothing for anyone to act on
        return None
    resource = {
        "prefect.resource.id": f"anomaly.model.{root}.{outcome['model_version']}",
        "prefect.resource.name": str(outcome["model_version"]),
        "anomaly.workspace": root,
        "anomaly.model_version": str(outcome["model_version"]),
    }
    emit_event(
        name,
        resource=resource,
        related=[workspace_resource(root)],
        payload={"workspace": root, **{key: outcome.get(key) for key in MODEL_PAYLOAD_KEYS}},
    )
    return name
