from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import BatchFileError, SchemaError
from data.workspace import Workspace
from models import bundle
from models.scoring import ADDED_COLUMNS, batch_outputs, score_batch_file
from tests.conftest import FEATURES, RUN_DATE, make_rows, write_rows

SCORED_AT = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.UTC)


def _bundle(root):
    ws = Workspace.at(root)
    return ws, bundle.load_bundle(ws.version_dir(bundle.current_version(ws.models_dir)))


def test_score_batch_file_writes_flagged_rows_and_scores_with_the_documented_schema(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    source = write_rows(make_rows(3000, seed=7, anomaly_share=0.02), workspace_copy / "in" / "night.parquet", row_group_size=700)
    outputs = batch_outputs(ws, RUN_DATE, "night", write_scores=True)
    result = score_batch_file(loaded, source, "night", outputs, SCORED_AT, chunk_rows=1000)

    scores = pq.read_table(outputs.scores)
    assert scores.column_names == ["row_id", "label", "reconstruction_error", "is_anomaly", "model_version", "batch"]
    assert scores.num_rows == 3000 == result.rows_scored
    errors = scores.column("reconstruction_error").to_numpy()
    np.testing.assert_array_equal(scores.column("is_anomaly").to_numpy(zero_copy_only=False), errors > loaded.threshold)

    flagged = pq.read_table(outputs.flagged)
    assert flagged.column_names == ["row_id", *FEATURES, "label", *ADDED_COLUMNS]
    assert flagged.num_rows == result.rows_flagged == int((errors > loaded.threshold).sum())
    assert flagged.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert set(flagged.column("model_version").to_pylist()) == {loaded.version}
    assert set(flagged.column("batch").to_pylist()) == {"night"}
    assert (flagged.column("threshold").to_numpy() == loaded.threshold).all()
    metadata = pq.read_schema(outputs.flagged).metadata
    assert metadata[b"anomaly.model_version"] == loaded.version.encode()
    assert float(metadata[b"anomaly.threshold"]) == loaded.threshold
    # Input columns pass through unchanged.
    original = pq.read_table(source).to_pandas().set_index("row_id")
    back = flagged.to_pandas().set_index("row_id")
    np.testing.assert_array_equal(back[FEATURES].to_numpy(), original.loc[back.index, FEATURES].to_numpy())
    # Labelled anomalies are shifted far away: the model flags most of them.
    labels = result.summary["labels"]["classification_report"]["anomaly"]
    assert labels["recall"] > 0.8
    assert not list(outputs.flagged.parent.glob(".*.tmp"))


def test_normal_rows_are_flagged_near_the_expected_rate(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    source = write_rows(make_rows(20_000, seed=11), workspace_copy / "in" / "normal.parquet")
    result = score_batch_file(loaded, source, "normal", batch_outputs(ws, RUN_DATE, "normal", False), SCORED_AT)
    assert result.summary["flag_rate"] == pytest.approx(0.02, abs=0.01)
    assert result.outputs["scores"] is None


def test_rows_with_missing_or_infinite_features_are_quarantined_with_a_reason(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    table = make_rows(1000, seed=3)
    f1 = table.column("f1").to_numpy().copy()
    f1[[10, 20]] = [np.nan, np.inf]
    f4 = pa.array([None if i == 30 else 0.5 for i in range(1000)], type=pa.float64())
    table = table.set_column(2, "f1", pa.array(f1)).set_column(5, "f4", f4)
    source = write_rows(table, workspace_copy / "in" / "dirty.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "dirty", True)
    result = score_batch_file(loaded, source, "dirty", outputs, SCORED_AT, chunk_rows=256)
    assert (result.rows_read, result.rows_scored, result.rows_quarantined) == (1000, 997, 3)
    quarantined = pq.read_table(outputs.quarantine).to_pandas().set_index("row_id")
    assert sorted(quarantined.index) == [10, 20, 30]
    assert quarantined.loc[10, "reason_code"] == "missing_value" and quarantined.loc[10, "reason_column"] == "f1"
    assert quarantined.loc[20, "reason_code"] == "infinite_value"
    assert quarantined.loc[30, "reason_column"] == "f4"
    assert pq.read_table(outputs.scores).num_rows == 997


def test_a_mostly_bad_batch_fails_and_publishes_nothing(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    table = make_rows(100, seed=3)
    table = table.set_column(1, "f0", pa.array([np.nan] * 50 + [0.0] * 50))
    source = write_rows(table, workspace_copy / "in" / "bad.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "bad", True)
    with pytest.raises(BatchFileError, match="bad.parquet: 50 of 100 rows have missing or infinite feature values"):
        score_batch_file(loaded, source, "bad", outputs, SCORED_AT, max_bad_row_share=0.1)
    partition = ws.output_partition("flagged", RUN_DATE)
    assert not outputs.flagged.exists() and not outputs.scores.exists() and not outputs.quarantine.exists()
    assert not list(partition.glob("*")) if partition.exists() else True


def test_schema_errors_name_file_and_column_before_anything_is_written(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    source = write_rows(make_rows(100, seed=3).drop_columns(["f5"]), workspace_copy / "in" / "short.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "short", True)
    with pytest.raises(SchemaError, match=r"short.parquet, column 'f5': feature column is missing"):
        score_batch_file(loaded, source, "short", outputs, SCORED_AT)
    assert not outputs.flagged.parent.exists() or not any(outputs.flagged.parent.iterdir())


def test_an_input_column_named_like_an_output_column_is_refused(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    table = make_rows(100, seed=3).append_column("is_anomaly", pa.array([False] * 100))
    source = write_rows(table, workspace_copy / "in" / "clash.parquet")
    with pytest.raises(SchemaError, match="column 'is_anomaly'"):
        score_batch_file(loaded, source, "clash", batch_outputs(ws, RUN_DATE, "clash", True), SCORED_AT)


def test_rescoring_replaces_outputs(workspace_copy):
    ws, loaded = _bundle(workspace_copy)
    source = write_rows(make_rows(500, seed=5), workspace_copy / "in" / "again.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "again", True)
    score_batch_file(loaded, source, "again", outputs, SCORED_AT)
    score_batch_file(loaded, source, "again", outputs, SCORED_AT)
    assert pq.read_table(outputs.scores).num_rows == 500
    assert len(list(outputs.scores.parent.iterdir())) == 1
