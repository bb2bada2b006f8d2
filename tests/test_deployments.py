"""The deployments of prefect.yaml on a real Prefect server and process worker, run as the UI runs them."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import yaml

from data.demo import make_tutorial_data, rows_table
from data.workspace import Workspace
from tests.stack_fixtures import PREFECT_YAML, REPO, as_utc, prefect_stack_fixture  # noqa: F401  (provides the prefect_stack fixture)

pytestmark = pytest.mark.slow

RETRAINING = "retrain-autoencoder/weekly-retraining"
SCORING = "score-batches/nightly-scoring"
EVALUATION = "evaluate-labels/nightly-evaluation"
BACKFILL = "backfill-scores/backfill"
FIRST_NIGHT = dt.date(2026, 11, 27)
SECOND_NIGHT = dt.date(2026, 11, 28)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[dt.date, int]]:
    """A workspace with 6000 labelled training rows and two nights of 1000 rows each, in two files a night."""
    root = tmp_path_factory.mktemp("deployed-ws")
    features, labels = make_tutorial_data(n_samples=8000, random_state=5)
    ids = np.arange(len(labels))
    ws = Workspace.at(root)
    ws.training_dir.mkdir(parents=True)
    pq.write_table(rows_table(features[:6000], labels[:6000], ids[:6000]), ws.training_dir / "training.parquet")
    nights = {}
    for night, rows in ((FIRST_NIGHT, slice(6000, 7000)), (SECOND_NIGHT, slice(7000, 8000))):
        folder = ws.incoming_for(night)
        folder.mkdir(parents=True)
        for i, part in enumerate(np.array_split(ids[rows], 2)):
            pq.write_table(rows_table(features[part], labels[part], part), folder / f"part-{i}.parquet")
        nights[night] = 1000
    return root, nights


@pytest.fixture(scope="module")
def retrained(prefect_stack, workspace):
    """The workspace after a retraining run of the deployment, triggered through the API with parameters."""
    root, _ = workspace
    run_id = prefect_stack.run_deployment(RETRAINING, {"workspace": str(root), "epochs": 5, "seed": 7})
    [run] = prefect_stack.wait_for(run_id)
    return run


def _deployment(stack, name: str):
    with stack.client() as client:
        return client.read_deployment_by_name(name)


def test_deployments_are_registered_as_prefect_yaml_declares(prefect_stack):
    declared = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for name in (RETRAINING, SCORING, EVALUATION):
        deployment = _deployment(prefect_stack, name)
        spec = declared[deployment.name]
        assert deployment.work_pool_name == "anomaly-process-pool"
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        assert deployment.enforce_parameter_schema is True
        assert set(deployment.tags) == set(spec["tags"]) and deployment.description == spec["description"]
        # The pull step puts flow runs in this repository, wherever the worker was started.
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        [schedule] = deployment.schedules
        [declared_schedule] = spec["schedules"]
        assert schedule.active is True
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (
            declared_schedule["cron"],
            declared_schedule["timezone"],
        )
        assert deployment.parameters["workspace"] == "./workspace"

    retraining, scoring = _deployment(prefect_stack, RETRAINING), _deployment(prefect_stack, SCORING)
    assert retraining.schedules[0].schedule.cron.split()[4] != "*", "retraining runs on one day of the week"
    assert scoring.schedules[0].schedule.cron.split()[2:] == ["*", "*", "*"], "scoring runs every day"
    # "Today" for scoring is decided in the schedules' time zone.
    assert scoring.parameters["timezone"] == scoring.schedules[0].schedule.timezone


def test_the_backfill_deployment_has_no_schedule_and_asks_for_its_two_dates(prefect_stack):
    backfill = _deployment(prefect_stack, BACKFILL)
    assert backfill.schedules == [] and backfill.parameters == {"workspace": "./workspace"}
    schema = backfill.parameter_openapi_schema
    assert set(schema["required"]) == {"start_date", "end_date"}
    assert [schema["properties"][name]["format"] for name in ("start_date", "end_date")] == ["date", "date"]


def test_every_parameter_has_a_title_a_type_and_a_description(prefect_stack):
    for name in (RETRAINING, SCORING, EVALUATION, BACKFILL):
        schema = _deployment(prefect_stack, name).parameter_openapi_schema
        assert schema["properties"], name
        for parameter, spec in schema["properties"].items():
            where = f"{name}: {parameter}"
            # A title the form shows as a label, not the bare identifier.
            assert spec.get("title") and spec["title"] != parameter and "_" not in spec["title"], where
            types = [spec["type"]] if "type" in spec else [option.get("type") for option in spec.get("anyOf", [])]
            assert types and all(types), where
            assert len(spec.get("description", "")) > 20, where


@pytest.mark.parametrize(
    ("name", "parameters", "refused"),
    [
        (SCORING, {"chunk_rows": 10}, "chunk_rows"),
        (SCORING, {"batch_paths": "incoming/x.parquet"}, "batch_paths"),
        (RETRAINING, {"percentile": 150}, "percentile"),
        (RETRAINING, {"preset": "fastest"}, "preset"),
    ],
)
def test_the_server_refuses_a_run_with_an_invalid_parameter_and_names_it(prefect_stack, name, parameters, refused):
    from prefect.exceptions import PrefectHTTPStatusError

    with pytest.raises(PrefectHTTPStatusError, match=refused) as caught:
        prefect_stack.run_deployment(name, parameters)
    assert caught.value.response.status_code == 409


def test_a_run_with_a_malformed_date_fails_at_once_naming_the_parameter(prefect_stack, tmp_path):
    # The server does not check string formats such as "date"; the flow's own validation does.
    run_id = prefect_stack.run_deployment(SCORING, {"workspace": str(tmp_path), "run_date": "27/11/2026"})
    [run] = prefect_stack.wait_until_final(run_id)
    assert run.state.is_failed() and "run_date" in run.state.message, run.state.message
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_a_retraining_run_writes_and_promotes_a_model_bundle(retrained, workspace):
    root, _ = workspace
    ws = Workspace.at(root)
    current = json.loads((ws.models_dir / "current.json").read_text())
    bundle = json.loads((ws.version_dir(current["model_version"]) / "bundle.json").read_text())
    assert bundle["config"]["epochs"] == 5 and bundle["seed"] == 7, "the run's parameters reached the flow"
    assert bundle["threshold"]["percentile"] == 98.0 and bundle["threshold"]["value"] > 0
    assert len(bundle["features"]) == 32
    assert (ws.version_dir(current["model_version"]) / "model.keras").stat().st_size > 0


def test_a_scoring_run_writes_flagged_rows_and_reports(prefect_stack, retrained, workspace):
    root, nights = workspace
    ws = Workspace.at(root)
    run_id = prefect_stack.run_deployment(SCORING, {"workspace": str(root), "run_date": FIRST_NIGHT.isoformat()})
    prefect_stack.wait_for(run_id)

    flagged_files = sorted(ws.output_partition("flagged", FIRST_NIGHT).glob("*.parquet"))
    assert [f.name for f in flagged_files] == ["part-0.parquet", "part-1.parquet"]
    flagged = pd.read_parquet(ws.output_partition("flagged", FIRST_NIGHT))
    assert (
        len(flagged) > 0
        and flagged["is_anomaly"].all()
        and (flagged["reconstruction_error"] > flagged["threshold"]).all()
    )
    report = json.loads((ws.output_partition("reports", FIRST_NIGHT) / "run-report.json").read_text())
    assert report["rows_scored"] == nights[FIRST_NIGHT] and report["rows_flagged"] == len(flagged)
    assert len(pd.read_parquet(ws.output_partition("scores", FIRST_NIGHT))) == nights[FIRST_NIGHT]


def test_two_runs_of_a_night_at_once_run_one_after_the_other_and_write_once(prefect_stack, retrained, workspace):
    root, nights = workspace
    ws = Workspace.at(root)
    parameters = {"workspace": str(root), "run_date": SECOND_NIGHT.isoformat()}
    ids = [prefect_stack.run_deployment(SCORING, parameters) for _ in range(2)]
    runs = sorted(prefect_stack.wait_for(*ids), key=lambda r: r.start_time)
    first, second = runs

    # The deployment's concurrency limit of 1 held the second run back until the first had finished.
    assert as_utc(second.start_time) >= as_utc(first.end_time)
    with prefect_stack.client() as client:
        waited = [{s.name for s in client.read_flow_run_states(r.id)} for r in runs]
    assert any("AwaitingConcurrencySlot" in names for names in waited), waited

    # Only the first run wrote; the second found the night scored by the same model and skipped it.
    flagged = pd.read_parquet(ws.output_partition("flagged", SECOND_NIGHT))
    scored_at = {as_utc(t.to_pydatetime()) for t in flagged["scored_at"]}
    assert len(scored_at) == 1
    assert as_utc(first.start_time) <= scored_at.pop() <= as_utc(first.end_time)
    outputs = list(ws.output_partition("flagged", SECOND_NIGHT).glob("*.parquet")) + list(
        ws.output_partition("scores", SECOND_NIGHT).glob("*.parquet")
    )
    assert len(outputs) == 4
    assert all(dt.datetime.fromtimestamp(p.stat().st_mtime, tz=dt.UTC) < as_utc(second.start_time) for p in outputs)

    scores = pd.read_parquet(ws.output_partition("scores", SECOND_NIGHT))
    assert len(scores) == nights[SECOND_NIGHT] and scores["row_id"].is_unique


ALARM_NIGHT = dt.date(2026, 11, 25)
FAILED_NIGHT = dt.date(2026, 11, 24)


def test_make_serve_applied_the_automations_once_each_with_a_26_hour_proactive_trigger(prefect_stack):
    from prefect.events.actions import SendNotification

    from flows.automations import ALARM_NAME, FAILURE_NAME, MISSING_NAME, WEBHOOK_BLOCK

    assert f"notifications: webhook block {WEBHOOK_BLOCK}" in prefect_stack.serve_output
    # Applying again (the documented command against a running server) updates them in place.
    env = {**prefect_stack.env, "PREFECT_API_URL": prefect_stack.api_url}
    again = subprocess.run(
        [str(REPO / ".venv" / "bin" / "anomaly"), "alerts"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert [a["action"] for a in json.loads(again.stdout.splitlines()[-1])["automations"]] == ["updated"] * 3
    with prefect_stack.client() as client:
        found = {name: client.read_automations_by_name(name) for name in (ALARM_NAME, FAILURE_NAME, MISSING_NAME)}
        block = client.read_block_document_by_name(WEBHOOK_BLOCK, "custom-webhook")
    assert {name: len(automations) for name, automations in found.items()} == dict.fromkeys(found, 1)
    [missing] = found[MISSING_NAME]
    assert missing.trigger.posture == "Proactive" and missing.trigger.within == dt.timedelta(hours=26)
    assert missing.trigger.expect == {"prefect.flow-run.Completed"}
    assert missing.trigger.match_related.model_dump()["prefect.resource.name"] == ["nightly-scoring"]
    for [automation] in found.values():
        assert (
            automation.enabled
            and isinstance(automation.actions[0], SendNotification)
            and automation.actions[0].block_document_id == block.id
        )


def test_a_shifted_night_and_a_corrupt_night_reach_the_webhook(prefect_stack, retrained, workspace):
    root, _ = workspace
    ws = Workspace.at(root)
    rows = pq.read_table(ws.training_dir / "training.parquet").slice(0, 1000)
    normal = rows.filter(pa.compute.equal(rows.column("label"), 0))
    shifted = normal.set_column(1, "f00", pa.compute.add(normal.column("f00"), 3 * float(np.std(normal.column("f00")))))
    ws.incoming_for(ALARM_NIGHT).mkdir(parents=True)
    pq.write_table(shifted, ws.incoming_for(ALARM_NIGHT) / "shifted.parquet")
    ws.incoming_for(FAILED_NIGHT).mkdir(parents=True)
    (ws.incoming_for(FAILED_NIGHT) / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")

    alarm_id = prefect_stack.run_deployment(
        SCORING, {"workspace": str(root), "run_date": ALARM_NIGHT.isoformat(), "catch_up_days": 0}
    )
    failed_id = prefect_stack.run_deployment(
        SCORING, {"workspace": str(root), "run_date": FAILED_NIGHT.isoformat(), "catch_up_days": 0}
    )
    alarm_run, failed_run = prefect_stack.wait_until_final(alarm_id, failed_id)
    assert alarm_run.state.is_completed() and failed_run.state.is_failed(), (alarm_run.state, failed_run.state)

    report = json.loads((ws.output_partition("reports", ALARM_NIGHT) / "run-report.json").read_text())
    assert report["alarm"] and "input_drift:f00" in report["alarm_reasons"]
    assert (
        report["drift"]["drifted_features"][0] == "f00"
        and (ws.output_partition("reports", ALARM_NIGHT) / "run-report-drift.png").stat().st_size > 5_000
    )

    alarm = prefect_stack.alerts.wait_for(lambda text: f"Anomaly alarm for {ALARM_NIGHT}" in text)
    assert "input_drift:f00" in alarm and f"/runs/flow-run/{alarm_id}" in alarm
    failure = prefect_stack.alerts.wait_for(lambda text: f"score-{FAILED_NIGHT}" in text and "Failed" in text)
    assert (
        f"Date: {FAILED_NIGHT}" in failure and f"/runs/flow-run/{failed_id}" in failure and "corrupt.parquet" in failure
    )

    # The events behind them name the workspace and the date; retraining announced its promotion.
    wanted = {
        ("anomaly.night.scored", FAILED_NIGHT.isoformat()),
        ("anomaly.night.alarm", FAILED_NIGHT.isoformat()),
        ("anomaly.night.alarm", ALARM_NIGHT.isoformat()),
    }
    # Automations see an event as it arrives; the events API lists it once the server has stored it, a little later.
    deadline = time.monotonic() + 60
    while True:
        with prefect_stack.client() as client:
            events = client._client.post(
                "/events/filter", json={"filter": {"event": {"prefix": ["anomaly."]}}, "limit": 50}
            ).json()["events"]
        nights = {
            (e["event"], e["resource"]["anomaly.date"]): e for e in events if e["event"].startswith("anomaly.night.")
        }
        if wanted <= set(nights) or time.monotonic() > deadline:
            break
        time.sleep(1)
    scored = nights[("anomaly.night.scored", FAILED_NIGHT.isoformat())]
    assert scored["resource"]["anomaly.workspace"] == str(root) and scored["payload"]["batches_failed"] == 1
    assert nights[("anomaly.night.alarm", FAILED_NIGHT.isoformat())]["payload"]["alarm_reasons"] == ["batches_failed"]
    assert nights[("anomaly.night.alarm", ALARM_NIGHT.isoformat())]["payload"]["alarm"] is True
    [promoted] = [e for e in events if e["event"] == "anomaly.model.promoted"]
    assert promoted["payload"]["promoted"] is True and promoted["resource"]["anomaly.workspace"] == str(root)


def test_the_evaluation_deployment_joins_later_labels_to_the_scored_nights(prefect_stack, retrained, workspace):
    root, nights = workspace
    ws = Workspace.at(root)
    run_id = prefect_stack.run_deployment(SCORING, {"workspace": str(root), "run_date": FIRST_NIGHT.isoformat()})
    prefect_stack.wait_for(run_id)
    # Labels of the first night's rows arrive later, in the labels/ folder.
    _, labels = make_tutorial_data(n_samples=8000, random_state=5)
    (ws.root / "labels").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"row_id": np.arange(6000, 7000), "label": labels[6000:7000]}), ws.root / "labels" / "reviews.parquet"
    )

    run_id = prefect_stack.run_deployment(
        EVALUATION, {"workspace": str(root), "end_date": SECOND_NIGHT.isoformat(), "window_days": 7}
    )
    [run] = prefect_stack.wait_for(run_id)
    first = pq.read_table(ws.output_partition("evaluation", FIRST_NIGHT)).to_pylist()
    [row] = first
    assert (
        row["rows_scored"] == nights[FIRST_NIGHT]
        and row["rows_labelled"] == nights[FIRST_NIGHT]
        and row["recall_known"]
    )
    assert 0 < row["precision"] <= 1 and 0 < row["recall"] <= 1 and row["roc_auc"] > 0.5
    assert (ws.outputs_dir / "reports" / "evaluation-trend" / "evaluation-trend.png").stat().st_size > 5_000
    with prefect_stack.client() as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == f"evaluation-trend-{SECOND_NIGHT.isoformat()}" for a in artifact)
