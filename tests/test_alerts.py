"""The alerting automations as defined in code, and a night's alarm codes.

The end-to-end check is in test_deployments.py.
"""

from __future__ import annotations

import datetime as dt
from uuid import uuid4

from flows.automations import MISSING_RUN_WINDOW, WEBHOOK_ENV, automation_definitions
from models.monitoring.drift import with_alarm


def test_without_a_webhook_the_automations_exist_and_do_nothing_saying_so() -> None:
    definitions = automation_definitions(None)
    assert len(definitions) == 3 and len({d.name for d in definitions}) == 3
    for definition in definitions:
        assert [a.type for a in definition.actions] == ["do-nothing"]
        assert WEBHOOK_ENV in definition.description


def test_with_a_webhook_each_automation_notifies_with_the_date_the_verdict_and_a_link() -> None:
    block = uuid4()
    alarm, failure, missing = automation_definitions(block)
    for definition in (alarm, failure, missing):
        [action] = definition.actions
        assert action.type == "send-notification" and action.block_document_id == block
        assert "Date:" in action.body and "Verdict:" in action.body
    assert "{{ flow_run|ui_url }}" in alarm.actions[0].body and "{{ flow_run|ui_url }}" in failure.actions[0].body
    assert alarm.trigger.expect == {"anomaly.night.alarm"}
    assert failure.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert (
        missing.trigger.posture == "Proactive"
        and missing.trigger.within == MISSING_RUN_WINDOW == dt.timedelta(hours=26)
    )


def test_a_night_alarms_for_each_reason_and_only_then() -> None:
    quiet = with_alarm(
        {
            "flag_rate_verdict": "within",
            "drift": {"drifted_features": [], "score": {"drifted": False}},
            "failed_batches": [],
        }
    )
    assert quiet["alarm"] is False and quiet["alarm_reasons"] == []
    loud = with_alarm(
        {
            "flag_rate_verdict": "above",
            "drift": {"drifted_features": ["f3", "f1"], "score": {"drifted": True}},
            "failed_batches": [{"batch": "x"}],
        }
    )
    assert loud["alarm"] is True
    assert loud["alarm_reasons"] == [
        "flag_rate_above_band",
        "input_drift:f3",
        "input_drift:f1",
        "score_drift",
        "batches_failed",
    ]
    assert with_alarm({"flag_rate_verdict": "below", "drift": None})["alarm_reasons"] == ["flag_rate_below_band"]


def test_applying_without_a_server_address_is_refused_naming_the_setting(capsys) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["alerts"]) == 1
    out, err = capsys.readouterr()
    assert "PREFECT_API_URL is not set" in err and '"status": "failed"' in out
