from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import BatchFileError, SchemaError, TrainingDataError
from data.parquet import (
    ANOMALY,
    NORMAL,
    UNLABELLED,
    check_batch_schema,
    feature_matrix,
    iter_record_batches,
    read_training_rows,
    resolve_parquet_files,
)
from tests.conftest import FEATURES, make_rows, write_rows


def test_resolve_parquet_files_accepts_file_folder_and_glob(tmp_path):
    a = write_rows(make_rows(10, 0), tmp_path / "a" / "one.parquet")
    b = write_rows(make_rows(10, 1), tmp_path / "a" / "sub" / "two.parquet")
    (tmp_path / "a" / ".hidden.parquet").write_bytes(b"x")
    assert resolve_parquet_files(a) == [a.resolve()]
    assert resolve_parquet_files(tmp_path / "a") == [a.resolve(), b.resolve()]
    assert resolve_parquet_files(str(tmp_path / "a" / "*.parquet")) == [a.resolve()]
    assert resolve_parquet_files(tmp_path / "nothing") == []


def test_check_batch_schema_reports_rows_and_passthrough_columns(tmp_path):
    path = write_rows(make_rows(100, 0), tmp_path / "b.parquet", row_group_size=30)
    schema = check_batch_schema(path, FEATURES)
    assert schema.num_rows == 100
    assert schema.num_row_groups == 4
    assert schema.passthrough_columns == ["row_id", "label"]


@pytest.mark.parametrize(
    ("table", "column", "code"),
    [
        (make_rows(10, 0).drop_columns(["f3"]), "f3", "missing_column"),
        (make_rows(10, 0).set_column(2, "f1", pa.array([str(i) for i in range(10)])), "f1", "non_numeric_column"),
        (make_rows(10, 0).append_column("f2", pa.array(np.zeros(10))), "f2", "duplicate_column"),
    ],
)
def test_check_batch_schema_names_file_and_column(tmp_path, table, column, code):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(SchemaError) as caught:
        check_batch_schema(path, FEATURES)
    assert caught.value.column == column
    assert caught.value.code == code
    assert str(path) in str(caught.value) and column in str(caught.value)


def test_check_batch_schema_refuses_non_parquet_and_empty_files(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(BatchFileError, match="junk.parquet: not a readable Parquet file"):
        check_batch_schema(junk, FEATURES)
    empty = write_rows(make_rows(10, 0).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(BatchFileError, match="empty.parquet: file has no rows"):
        check_batch_schema(empty, FEATURES)


def test_integer_and_float32_features_are_accepted_and_cast(tmp_path):
    table = make_rows(20, 0)
    table = table.set_column(1, "f0", pa.array(np.arange(20), type=pa.int32()))
    table = table.set_column(2, "f1", table.column("f1").cast(pa.float32()))
    path = write_rows(table, tmp_path / "mixed.parquet")
    check_batch_schema(path, FEATURES)
    batch = next(iter_record_batches(path))
    matrix = feature_matrix(batch, FEATURES, dtype=np.float64)
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix[:, 0], np.arange(20))


def test_feature_matrix_turns_nulls_into_nan():
    table = pa.table({"a": pa.array([1.0, None, 3.0]), "b": pa.array([1, 2, None], type=pa.int64())})
    matrix = feature_matrix(table, ["a", "b"])
    assert np.isnan(matrix[1, 0]) and np.isnan(matrix[2, 1])
    assert matrix[0, 0] == 1.0 and matrix[1, 1] == 2.0


def test_iter_record_batches_streams_in_chunks(tmp_path):
    path = write_rows(make_rows(1000, 0), tmp_path / "big.parquet", row_group_size=250)
    sizes = [b.num_rows for b in iter_record_batches(path, chunk_rows=100)]
    assert max(sizes) <= 100 and sum(sizes) == 1000


def test_read_training_rows_splits_normal_and_requires_label(tmp_path):
    path = write_rows(make_rows(200, 0, anomaly_share=0.1), tmp_path / "t.parquet")
    rows = read_training_rows(path, "label", "0")
    assert rows.feature_names == FEATURES
    assert rows.features.shape == (200, len(FEATURES))
    assert (rows.classes == NORMAL).sum() == (pq.read_table(path).column("label").to_numpy() == 0).sum()
    with pytest.raises(TrainingDataError, match="label column 'target' is missing.*all_rows_normal"):
        read_training_rows(path, "target", "0")
    assert (
        read_training_rows(
            path, "target", "0", all_rows_normal=True, exclude_columns=("row_id", "label")
        ).classes.tolist()
        == [NORMAL] * 200
    )


def test_max_rows_keeps_a_seeded_uniform_sample_across_files_with_labels_aligned(tmp_path):
    for k in range(5):
        # f0 holds the file and its label: 10 * file + label, so alignment and spread can be read back.
        table = make_rows(2000, seed=k, anomaly_share=0.1)
        labels = table.column("label").to_numpy()
        write_rows(table.set_column(1, "f0", pa.array(10.0 * k + labels)), tmp_path / f"part-{k}.parquet")
    every = read_training_rows(tmp_path, "label", "0")
    assert every.features.shape == (10_000, len(FEATURES)) and every.rows_read == 10_000
    sample = read_training_rows(tmp_path, "label", "0", max_rows=1000, seed=3)
    assert sample.features.shape == (1000, len(FEATURES)) and sample.rows_read == 10_000
    assert ((sample.features[:, 0] % 10 == 1) == (sample.classes != NORMAL)).all()
    per_file = np.bincount((sample.features[:, 0] // 10).astype(int), minlength=5)
    assert (abs(per_file - 200) < 60).all(), per_file
    again = read_training_rows(tmp_path, "label", "0", max_rows=1000, seed=3)
    other = read_training_rows(tmp_path, "label", "0", max_rows=1000, seed=4)
    assert (again.features == sample.features).all() and not (other.features == sample.features).all()
    assert read_training_rows(tmp_path, "label", "0", max_rows=20_000).features.shape[0] == 10_000


def test_columns_that_are_not_features_are_named_with_why(tmp_path):
    table = make_rows(50, 0).append_column("session", pa.array([f"s-{i}" for i in range(50)]))
    table = table.append_column("currency", pa.array(["EUR", "USD"] * 25))
    table = table.append_column("payload", pa.array([b"\x00"] * 50))
    rows = read_training_rows(write_rows(table, tmp_path / "t.parquet"), "label", "0")
    assert rows.feature_names == [*FEATURES, "currency"]
    assert rows.ignored_columns == {
        "row_id": "identifier",
        "label": "label",
        "session": "identifier: a distinct value on every row",
        "payload": "unsupported type binary: only numeric, boolean and text columns are features",
    }
    chosen = read_training_rows(tmp_path / "t.parquet", "label", "0", feature_columns=FEATURES[:2])
    assert chosen.ignored_columns[FEATURES[2]] == "not among feature_columns"


def test_training_rows_without_a_label_are_neither_normal_nor_anomalous(tmp_path):
    table = make_rows(100, 0, anomaly_share=0.2)
    labels = table.column("label").to_pylist()
    labels[:10] = [None] * 10
    path = write_rows(table.set_column(7, "label", pa.array(labels, type=pa.int64())), tmp_path / "t.parquet")
    rows = read_training_rows(path, "label", "0")
    assert (rows.classes == UNLABELLED).sum() == 10
    assert (rows.classes == ANOMALY).sum() == sum(1 for v in labels[10:] if v == 1)


def test_a_feature_named_like_an_output_column_is_refused_at_training(tmp_path):
    path = write_rows(
        make_rows(50, 0).rename_columns(["row_id", "threshold", "f1", "f2", "f3", "f4", "f5", "label"]),
        tmp_path / "t.parquet",
    )
    with pytest.raises(
        TrainingDataError, match="column 'threshold': a feature may not be named like a column the outputs add"
    ):
        read_training_rows(path, "label", "0")


def test_read_training_rows_refuses_missing_values_and_empty_source(tmp_path):
    table = make_rows(50, 0)
    values = table.column("f2").to_numpy().copy()
    values[3] = np.nan
    path = write_rows(table.set_column(3, "f2", pa.array(values)), tmp_path / "nan.parquet")
    # Refused where missing values are to be quarantined; by default they are kept for the model to fill in.
    with pytest.raises(TrainingDataError, match=r"nan.parquet, column 'f2': 1 rows hold NaN"):
        read_training_rows(path, "label", "0", missing_values="quarantine")
    assert read_training_rows(path, "label", "0").missing_values == {"f2": 1}
    with pytest.raises(TrainingDataError, match="no .parquet files"):
        read_training_rows(tmp_path / "missing", "label", "0")
