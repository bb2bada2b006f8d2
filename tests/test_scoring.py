from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import BatchFileError, SchemaError
from data.output_schema import FLAGGED_COLUMNS, reason_fields
from data.outputs import batch_outputs
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from tests.conftest import FEATURES, RUN_DATE, SCORED_AT, current_bundle, make_rows, write_rows


def test_score_batch_file_writes_flagged_rows_and_scores_with_the_documented_schema(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(
        make_rows(3000, seed=7, anomaly_share=0.02), workspace_copy / "in" / "night.parquet", row_group_size=700
    )
    outputs = batch_outputs(ws, RUN_DATE, "night")
    result = score_file(loaded, source, "night", outputs, ScoringOptions(scored_at=SCORED_AT, chunk_rows=1000))

    scores = pq.read_table(outputs.scores)
    assert scores.column_names == ["row_id", "label", "reconstruction_error", "is_anomaly", "model_version", "batch"]
    assert scores.num_rows == 3000 == result.rows_scored
    errors = scores.column("reconstruction_error").to_numpy()
    np.testing.assert_array_equal(scores.column("is_anomaly").to_numpy(zero_copy_only=False), errors > loaded.threshold)

    flagged = pq.read_table(outputs.flagged)
    assert flagged.column_names == [
        "row_id",
        *FEATURES,
        "label",
        *FLAGGED_COLUMNS,
        *(name for name, _ in reason_fields(3)),
    ]
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
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(20_000, seed=11), workspace_copy / "in" / "normal.parquet")
    result = score_file(
        loaded,
        source,
        "normal",
        batch_outputs(ws, RUN_DATE, "normal"),
        ScoringOptions(scored_at=SCORED_AT, write_scores=False),
    )
    assert result.summary["flag_rate"] == pytest.approx(0.02, abs=0.01)
    assert result.outputs["scores"] is None


def test_rows_with_missing_or_infinite_features_are_quarantined_with_a_reason(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    table = make_rows(1000, seed=3)
    f1 = table.column("f1").to_numpy().copy()
    f1[[10, 20]] = [np.nan, np.inf]
    f4 = pa.array([None if i == 30 else 0.5 for i in range(1000)], type=pa.float64())
    table = table.set_column(2, "f1", pa.array(f1)).set_column(5, "f4", f4)
    source = write_rows(table, workspace_copy / "in" / "dirty.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "dirty")
    result = score_file(loaded, source, "dirty", outputs, ScoringOptions(scored_at=SCORED_AT, chunk_rows=256))
    assert (result.rows_read, result.rows_scored, result.rows_quarantined) == (1000, 997, 3)
    quarantined = pq.read_table(outputs.quarantine).to_pandas().set_index("row_id")
    assert sorted(quarantined.index) == [10, 20, 30]
    assert quarantined.loc[10, "reason_code"] == "missing_value" and quarantined.loc[10, "reason_column"] == "f1"
    assert quarantined.loc[20, "reason_code"] == "infinite_value"
    assert quarantined.loc[30, "reason_column"] == "f4"
    assert pq.read_table(outputs.scores).num_rows == 997


def test_a_mostly_bad_batch_fails_and_publishes_nothing(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    table = make_rows(100, seed=3)
    table = table.set_column(1, "f0", pa.array([np.nan] * 50 + [0.0] * 50))
    source = write_rows(table, workspace_copy / "in" / "bad.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "bad")
    with pytest.raises(
        BatchFileError, match="bad.parquet: 50 of 100 rows have missing, infinite or out-of-range feature values"
    ):
        score_file(loaded, source, "bad", outputs, ScoringOptions(scored_at=SCORED_AT, max_bad_row_share=0.1))
    partition = ws.output_partition("flagged", RUN_DATE)
    assert not outputs.flagged.exists() and not outputs.scores.exists() and not outputs.quarantine.exists()
    assert not list(partition.glob("*")) if partition.exists() else True


def test_schema_errors_name_file_and_column_before_anything_is_written(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(100, seed=3).drop_columns(["f5"]), workspace_copy / "in" / "short.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "short")
    with pytest.raises(SchemaError, match=r"short.parquet, column 'f5': feature column is missing"):
        score_file(loaded, source, "short", outputs, ScoringOptions(scored_at=SCORED_AT))
    assert not outputs.flagged.parent.exists() or not any(outputs.flagged.parent.iterdir())


def test_an_input_column_named_like_an_output_column_is_refused(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    table = make_rows(100, seed=3).append_column("is_anomaly", pa.array([False] * 100))
    source = write_rows(table, workspace_copy / "in" / "clash.parquet")
    with pytest.raises(SchemaError, match="column 'is_anomaly'"):
        score_file(loaded, source, "clash", batch_outputs(ws, RUN_DATE, "clash"), ScoringOptions(scored_at=SCORED_AT))


def test_rescoring_replaces_outputs(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(500, seed=5), workspace_copy / "in" / "again.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "again")
    score_file(loaded, source, "again", outputs, ScoringOptions(scored_at=SCORED_AT))
    score_file(loaded, source, "again", outputs, ScoringOptions(scored_at=SCORED_AT))
    assert pq.read_table(outputs.scores).num_rows == 500
    assert len(list(outputs.scores.parent.iterdir())) == 1


def test_a_float64_beyond_float32s_range_is_quarantined_as_out_of_range(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    table = make_rows(200, seed=4)
    f3 = table.column("f3").to_numpy().copy()
    f3[[7, 8]] = [1e39, -np.inf]
    source = write_rows(table.set_column(4, "f3", pa.array(f3)), workspace_copy / "in" / "huge.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "huge")
    result = score_file(loaded, source, "huge", outputs, ScoringOptions(scored_at=SCORED_AT))
    quarantined = pq.read_table(outputs.quarantine).to_pandas().set_index("row_id")
    assert result.rows_quarantined == 2
    assert quarantined.loc[7, "reason_code"] == "out_of_range" and quarantined.loc[7, "reason_column"] == "f3"
    assert quarantined.loc[8, "reason_code"] == "infinite_value"


def test_rows_with_a_null_or_nan_label_are_scored_but_left_out_of_every_metric(workspace_copy):
    from sklearn.metrics import roc_auc_score

    ws, loaded = current_bundle(workspace_copy)
    table = make_rows(4000, seed=8, anomaly_share=0.05)
    labels = table.column("label").to_numpy().astype(np.float64)
    labels[::5] = np.nan
    labels[1::50] = np.nan
    source = write_rows(
        table.set_column(7, "label", pa.array(labels).cast(pa.float64())), workspace_copy / "in" / "partly.parquet"
    )
    outputs = batch_outputs(ws, RUN_DATE, "partly")
    result = score_file(loaded, source, "partly", outputs, ScoringOptions(scored_at=SCORED_AT))
    unlabelled = int(np.isnan(labels).sum())
    summary = result.summary
    assert summary["rows_scored"] == 4000 and summary["rows_unlabelled"] == unlabelled
    matrix = summary["labels"]["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == 4000 - unlabelled
    scores = pq.read_table(outputs.scores).to_pandas()
    known = scores[scores["label"].notna()]
    assert (
        abs(summary["labels"]["roc_auc"] - roc_auc_score(known["label"] == 1, known["reconstruction_error"])) <= 0.001
    )


@pytest.mark.parametrize(
    "name", sorted(__import__("data.output_schema", fromlist=["RESERVED_COLUMNS"]).RESERVED_COLUMNS)
)
def test_every_name_the_outputs_use_is_refused_as_an_input_column(tmp_path, name):
    from data.parquet import check_batch_schema

    source = write_rows(make_rows(10, seed=3).append_column(name, pa.array(["x"] * 10)), tmp_path / "clash.parquet")
    with pytest.raises(SchemaError, match=f"column '{name}': input already has a column the outputs add") as caught:
        check_batch_schema(source, FEATURES)
    assert caught.value.code == "reserved_column"


def test_scoring_without_scores_removes_the_earlier_scores_file(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(500, seed=5), workspace_copy / "in" / "again.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "again")
    score_file(loaded, source, "again", outputs, ScoringOptions(scored_at=SCORED_AT))
    assert outputs.scores.exists()
    result = score_file(loaded, source, "again", outputs, ScoringOptions(scored_at=SCORED_AT, write_scores=False))
    assert not outputs.scores.exists() and result.outputs["scores"] is None


def test_a_file_that_changes_while_it_is_scored_publishes_nothing(workspace_copy, monkeypatch):
    import models.scoring.batch
    from data.batches import Batch, write_record
    from data.storage import fingerprint
    from models.scoring.batch import score_batch

    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(800, seed=9), ws.incoming_for(RUN_DATE) / "moving.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "moving")
    write_record(ws, RUN_DATE, Batch("moving", source), loaded.version, fingerprint(source), {})
    real = models.scoring.batch.stream_batch_file

    def rewritten_meanwhile(*args, **kwargs):
        counts = real(*args, **kwargs)
        write_rows(make_rows(900, seed=10), source)
        return counts

    monkeypatch.setattr(models.scoring.batch, "stream_batch_file", rewritten_meanwhile)
    with pytest.raises(BatchFileError, match="moving.parquet: file changed while it was scored") as caught:
        score_batch(str(workspace_copy), RUN_DATE, Batch("moving", source), loaded)
    assert caught.value.code == "changed_during_scoring"
    assert not any(p.exists() for p in outputs.paths())
    assert not list(outputs.flagged.parent.glob(".*")), "no temporary is left behind"
    assert (ws.state_dir / "scored" / f"date={RUN_DATE}" / "moving.json").exists(), (
        "the record of the earlier bytes stays until outputs are replaced"
    )
