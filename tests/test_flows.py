"""The flows end to end under Prefect's test harness, on small data."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.demo import make_tutorial_data, rows_table
from data.workspace import Workspace
from tests.conftest import RUN_DATE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def retrained(harness, tmp_path_factory):
    """Retrain once on 32 Gaussian features; return the workspace, the run's result and rows left for scoring."""
    from flows.retrain import retrain_flow

    root = tmp_path_factory.mktemp("flow-ws")
    features, labels = make_tutorial_data(n_samples=16_000, random_state=3)
    ids = np.arange(len(labels))
    train = slice(0, 10_000)
    ws = Workspace.at(root)
    ws.training_dir.mkdir(parents=True)
    pq.write_table(rows_table(features[train], labels[train], ids[train]), ws.training_dir / "t.parquet")
    result = retrain_flow(workspace=str(root), epochs=6, seed=7)
    return root, result, (features[10_000:], labels[10_000:], ids[10_000:])


def _night(root, rows, n_files=3):
    features, labels, ids = rows
    normal = labels == 0
    folder = Workspace.at(root).incoming_for(RUN_DATE)
    for i, part in enumerate(np.array_split(np.flatnonzero(normal), n_files)):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            rows_table(features[part], labels[part], ids[part]), folder / f"part-{i}.parquet", row_group_size=500
        )
    return int(normal.sum())


def test_retraining_writes_a_promoted_bundle_and_its_report(retrained):
    root, result, _ = retrained
    ws = Workspace.at(root)
    version_dir = ws.version_dir(result["model_version"])
    assert json.loads((ws.models_dir / "current.json").read_text())["model_version"] == result["model_version"]
    bundle = json.loads((version_dir / "bundle.json").read_text())
    assert bundle["threshold"]["value"] == result["threshold"] and bundle["threshold"]["percentile"] == 98.0
    assert bundle["threshold"]["rows"] == result["validation_rows"] > 0
    assert bundle["preset"] == "default" and bundle["config"]["epochs"] == 6 and bundle["seed"] == 7
    for name in (
        "training-report.json",
        "training-report.md",
        "loss-curves.png",
        "holdout-error-histogram.png",
        "holdout-evaluation.json",
    ):
        assert (version_dir / "report" / name).stat().st_size > 0, name
    report = json.loads((version_dir / "report" / "training-report.json").read_text())
    # Fixed on one half of the held-out normal rows, the threshold flags about 2% of the other half.
    cross_check = json.loads((version_dir / "promotion.json").read_text())["checks"]["flag_rate_cross_check"]
    assert all(abs(rate - 0.02) <= cross_check["tolerance"] for rate in cross_check["rates"])
    assert report["history"]["epochs_run"] == 6
    assert not (version_dir / "_work").exists()
    assert result["threshold_warning"] is None and bundle["threshold"]["warning"] is None


def test_scoring_a_night_writes_outputs_reports_and_skips_on_rerun(retrained, tmp_path):
    from flows.score import score_flow

    base, result, rows = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    n_rows = _night(root, rows)
    outcome = score_flow(workspace=str(root), run_date=RUN_DATE)
    ws = Workspace.at(root)

    assert outcome["rows_scored"] == n_rows and outcome["batches_scored"] == 3
    assert outcome["flag_rate"] == pytest.approx(0.02, abs=0.01)
    flagged = pd.read_parquet(ws.outputs_dir / "flagged")
    assert len(flagged) == outcome["rows_flagged"]
    assert {
        "row_id",
        "f00",
        "label",
        "reconstruction_error",
        "threshold",
        "is_anomaly",
        "model_version",
        "batch",
        "scored_at",
        "date",
    } <= set(flagged.columns)
    assert flagged["is_anomaly"].all() and (flagged["reconstruction_error"] > flagged["threshold"]).all()
    count, versions = duckdb.sql(
        f"select count(*), count(distinct model_version) from read_parquet('{ws.outputs_dir}/flagged/**/*.parquet', "
        "hive_partitioning=true)"
    ).fetchall()[0]
    assert (count, versions) == (outcome["rows_flagged"], 1)
    assert duckdb.sql(f"select count(*) from '{ws.outputs_dir}/scores/**/*.parquet'").fetchall()[0][0] == n_rows

    run_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    assert run_report["rows_scored"] == n_rows and run_report["batches_scored"] == 3
    assert run_report["labels"]["classification_report"]["normal"]["support"] == n_rows
    assert (ws.output_partition("reports", RUN_DATE) / "run-report-error-histogram.png").stat().st_size > 0
    assert len(list((ws.output_partition("reports", RUN_DATE) / "batches").glob("*.json"))) == 3

    again = score_flow(workspace=str(root), run_date=RUN_DATE)
    assert (again["batches_scored"], again["batches_skipped"], again["rows_scored"]) == (0, 3, n_rows)
    forced = score_flow(workspace=str(root), run_date=RUN_DATE, force=True)
    assert forced["batches_scored"] == 3
    assert len(pd.read_parquet(ws.outputs_dir / "scores")) == n_rows

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert f"scoring-report-{RUN_DATE.isoformat()}" in keys
    assert f"training-report-{result['model_version']}".lower() in keys


def test_a_bad_file_fails_the_run_but_not_the_other_batches(retrained, tmp_path):
    from flows.score import BatchesFailedError, score_flow

    base, _, rows = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    n_rows = _night(root, rows, n_files=2)
    ws = Workspace.at(root)
    bad = ws.incoming_for(RUN_DATE) / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(
        BatchesFailedError, match=r"1 of 3 batch\(es\) failed.*broken.parquet: not a readable Parquet file"
    ) as caught:
        score_flow(workspace=str(root), run_date=RUN_DATE)
    assert caught.value.outcome["rows_scored"] == n_rows
    assert not (ws.output_partition("flagged", RUN_DATE) / "broken.parquet").exists()
    assert not (ws.state_dir / "scored" / f"date={RUN_DATE}" / "broken.json").exists()
    assert len(list((ws.state_dir / "scored" / f"date={RUN_DATE}").glob("*.json"))) == 2
    run_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    assert run_report["failed_batches"][0]["batch"] == "broken"


def test_scoring_with_no_batches_names_the_folder(retrained):
    from data.errors import NoBatchesError
    from flows.score import score_flow

    root, _, _ = retrained
    with pytest.raises(NoBatchesError, match="incoming/2030-01-01: no .parquet batches"):
        score_flow(workspace=str(root), run_date="2030-01-01")


def test_retraining_refuses_too_few_normal_rows_and_keeps_the_current_model(retrained, tmp_path):
    from data.errors import TrainingDataError
    from flows.retrain import retrain_flow

    base, result, rows = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    features, labels, ids = rows
    small = root / "small.parquet"
    normal = np.flatnonzero(labels == 0)[:49]
    pq.write_table(rows_table(features[normal], labels[normal], ids[normal]), small)
    with pytest.raises(
        TrainingDataError,
        match=(
            r"small.parquet'?: 49 normal rows; the 98th percentile cannot be estimated from fewer than 50 normal "
            r"rows.* at least 50 normal rows are needed"
        ),
    ):
        retrain_flow(workspace=str(root), training_data=str(small))
    ws = Workspace.at(root)
    assert json.loads((ws.models_dir / "current.json").read_text())["model_version"] == result["model_version"]
    assert not list(ws.models_dir.glob("*.partial"))


def test_retraining_on_a_few_hundred_rows_trains_on_all_of_them_and_says_how_unsure_its_threshold_is(
    retrained, tmp_path
):
    from flows.retrain import retrain_flow

    base, _, rows = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    features, labels, ids = rows
    normal = np.flatnonzero(labels == 0)[:300]
    small = root / "small.parquet"
    pq.write_table(rows_table(features[normal], labels[normal], ids[normal]), small)
    outcome = retrain_flow(workspace=str(root), training_data=str(small), promote=False)
    assert outcome["ignored_columns"] == {"row_id": "identifier", "label": "label"}
    assert outcome["missing_values_filled"] == {}
    assert (outcome["training_rows_read"], outcome["training_rows_sampled"]) == (300, None)
    # A 20% hold-out would fix the threshold on 60 rows and train on 240: cross-fitting uses all 300 for both.
    assert (outcome["training_rows"], outcome["validation_rows"], outcome["threshold_scheme"]) == (
        300,
        300,
        "cross_fit",
    )
    assert outcome["threshold_warning"].startswith(
        "the threshold rests on 300 normal rows scored out of fold: normal rows will exceed it at a rate anywhere "
        "between"
    )
    version_dir = Workspace.at(root).version_dir(outcome["model_version"])
    bundle = json.loads((version_dir / "bundle.json").read_text())
    assert bundle["threshold"]["warning"] == outcome["threshold_warning"]
    assert (bundle["threshold"]["scheme"], bundle["threshold"]["folds"], bundle["threshold"]["rows"]) == (
        "cross_fit",
        5,
        300,
    )
    assert (
        json.loads((version_dir / "report" / "training-report.json").read_text())["threshold"]["warning"]
        == outcome["threshold_warning"]
    )
    assert outcome["threshold_warning"] in (version_dir / "report" / "training-report.md").read_text()


def test_retraining_with_max_training_rows_trains_on_a_seeded_sample_and_says_of_how_many(retrained, tmp_path):
    from flows.retrain import retrain_flow

    base, _, _ = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    outcome = retrain_flow(workspace=str(root), max_training_rows=2000, promote=False, epochs=2, seed=7)
    assert (outcome["training_rows_read"], outcome["training_rows_sampled"]) == (10_000, 2000)
    # 2,000 rows cross-fit: every sampled normal row trains and fixes the threshold, beside the sampled anomalies.
    assert outcome["threshold_scheme"] == "cross_fit"
    assert outcome["training_rows"] == outcome["validation_rows"] == 2000 - outcome["holdout_anomalies"]
    report = json.loads(Path(outcome["report_json"]).read_text())
    assert (report["training"]["rows_read"], report["training"]["rows_total"]) == (10_000, 2000)


def test_retraining_with_label_history_trains_on_rows_labels_confirm_normal(retrained, tmp_path):
    from flows.retrain import retrain_flow

    base, _, rows = retrained
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    features, labels, ids = rows
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    small = root / "small.parquet"
    pq.write_table(rows_table(features[normal[:300]], labels[normal[:300]], ids[normal[:300]]), small)
    # Yesterday's night (UTC): 200 normal rows and 20 anomalies, scored without labels; the labels arrive later.
    night = np.concatenate([normal[300:500], anomalous[:20]])
    folder = Workspace.at(root).incoming_for(dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    folder.mkdir(parents=True)
    pq.write_table(
        rows_table(features[night], labels[night], ids[night]).drop_columns(["label"]), folder / "night.parquet"
    )
    (root / "labels").mkdir()
    pq.write_table(pa.table({"row_id": ids[night], "label": labels[night]}), root / "labels" / "review.parquet")

    outcome = retrain_flow(
        workspace=str(root), training_data=str(small), promote=False, use_label_history=True, label_history_days=3
    )
    assert (
        outcome["label_history"]["rows_confirmed_normal"],
        outcome["label_history"]["rows_confirmed_anomalous"],
    ) == (200, 20)
    # 500 normal rows: too few for a comfortable hold-out, so all of them train and fix the threshold out of fold.
    assert outcome["training_rows"] == outcome["validation_rows"] == 500 and outcome["holdout_anomalies"] == 20
    report = (Workspace.at(root).version_dir(outcome["model_version"]) / "report" / "training-report.md").read_text()
    assert "| normal rows of past nights confirmed by labels (in the splits above) | 200 |" in report


def test_a_first_model_of_120_normal_rows_is_trained_promoted_and_says_how_unsure_it_is(harness, tmp_path):
    from flows.retrain import retrain_flow

    features, labels = make_tutorial_data(n_samples=200, random_state=11)
    normal = np.flatnonzero(labels == 0)[:120]
    ws = Workspace.at(tmp_path)
    ws.training_dir.mkdir(parents=True)
    pq.write_table(rows_table(features[normal], labels[normal], normal), ws.training_dir / "few.parquet")
    outcome = retrain_flow(workspace=str(tmp_path), epochs=10)
    assert outcome["promoted"] and outcome["current_model"] == outcome["model_version"]
    assert (outcome["training_rows"], outcome["validation_rows"], outcome["threshold_scheme"]) == (
        120,
        120,
        "cross_fit",
    )
    assert outcome["threshold_warning"].startswith("the threshold rests on 120 normal rows scored out of fold")
    bundle = json.loads((ws.version_dir(outcome["model_version"]) / "bundle.json").read_text())
    low, high = bundle["threshold"]["uncertainty"]["confidence_interval"]
    assert low <= bundle["threshold"]["value"] <= high


def test_a_refused_first_model_says_so_with_the_command_and_scoring_names_it(harness, tmp_path, monkeypatch):
    from data.errors import BundleError
    from flows.retrain import retrain_flow
    from flows.score import score_flow
    from models.training import promotion

    refuse = promotion.check_promotion

    def refusing_gate(staging, *args, **kwargs):
        # The real gate's decision, refused, saved where the gate saves it.
        decision = refuse(staging, *args, **kwargs)
        decision = dataclasses.replace(decision, passed=False, reasons=["a refusal this test asks for"])
        (staging / "promotion.json").write_text(json.dumps(dataclasses.asdict(decision)))
        return decision

    monkeypatch.setattr(promotion, "check_promotion", refusing_gate)
    features, labels = make_tutorial_data(n_samples=1000, random_state=12)
    ws = Workspace.at(tmp_path)
    ws.training_dir.mkdir(parents=True)
    pq.write_table(rows_table(features, labels, np.arange(len(labels))), ws.training_dir / "t.parquet")
    records: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = records.append
    run_logger = logging.getLogger("prefect.flow_runs")
    run_logger.addHandler(listener)
    try:
        outcome = retrain_flow(workspace=str(tmp_path), epochs=5)
    finally:
        run_logger.removeHandler(listener)
    version = outcome["model_version"]
    assert not outcome["promoted"] and outcome["promotion_refused"] == ["a refusal this test asks for"]
    assert outcome["promote_command"] == f"anomaly promote {version}" and outcome["current_model"] is None
    # The run's log says what to do.
    logged = "\n".join(record.getMessage() for record in records if record.levelno >= logging.ERROR)
    assert (
        f"Model {version} is saved but NOT promoted, and no model is current" in logged
        and f"Promote it anyway with: anomaly promote {version}" in logged
    )
    folder = ws.incoming_for(RUN_DATE)
    folder.mkdir(parents=True)
    pq.write_table(rows_table(features[:100], labels[:100], np.arange(100)), folder / "night.parquet")
    with pytest.raises(
        BundleError,
        match=(
            rf"no current model; model {version} was trained but its promotion gate refused it: "
            rf"a refusal this test asks for\. Promote it with: anomaly promote {version}"
        ),
    ):
        score_flow(workspace=str(tmp_path), run_date=RUN_DATE)
