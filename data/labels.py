"""Labels that arrive after scoring: the workspace's labels/ folder, checked file by file, and each row's latest label.

A label file holds the id columns the scores output carries (default ``row_id``), the model's label
column and, optionally, ``labelled_at``. Where several files label one row, the latest ``labelled_at``
wins, then the file modified last (then the later name). Labels are compared as text with the
model's normal value, as in training; a null or NaN label labels nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data import storage
from data.errors import SchemaError
from data.parquet import is_numeric_type, label_classes, open_parquet, read_error
from data.workspace import Workspace

LABELLED_AT = "labelled_at"
LABEL_CLASS = "label_class"
FILE_RANK = "label_file_rank"
# Every label file's rows in one file, before the latest label of each row is picked.
STAGED_LABELS = "staged-labels.parquet"
DUCKDB_MEMORY_LIMIT = "512MB"


def labels_dir(workspace: Workspace) -> Path:
    """Return the folder where labels are dropped."""
    return workspace.root / "labels"


def label_files(workspace: Workspace) -> list[Path]:
    """Return the label files, oldest first (modification time, then name): later ones win ties."""
    files = storage.list_files(labels_dir(workspace), "*.parquet")
    return sorted(files, key=lambda path: (storage.size_and_mtime(path)[1], path.name))


def check_label_file(path: Path, id_columns: Sequence[str], label_column: str) -> pq.ParquetFile:
    """Check that a label file has the id columns, the label column and a timestamp ``labelled_at`` if any; open it."""
    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    for column in [*id_columns, label_column]:
        if column not in schema.names:
            what = "label" if column == label_column else "id"
            raise SchemaError(
                path,
                f"{what} column is missing; a label file holds {list(id_columns)}, "
                f"{label_column!r} and optionally {LABELLED_AT!r}",
                column=column,
                code="missing_column",
            )
    if LABELLED_AT in schema.names and not pa.types.is_timestamp(schema.field(LABELLED_AT).type):
        raise SchemaError(
            path, f"must be a timestamp, found {schema.field(LABELLED_AT).type}", column=LABELLED_AT, code="wrong_type"
        )
    label_type = schema.field(label_column).type
    if not (
        is_numeric_type(label_type)
        or pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
        or pa.types.is_boolean(label_type)
    ):
        raise SchemaError(
            path, f"label must be a number, text or boolean, found {label_type}", column=label_column, code="wrong_type"
        )
    return parquet


def stage_labels(
    workspace: Workspace, id_columns: Sequence[str], label_column: str, normal_label: str, target: Path
) -> dict[str, object]:
    """Check every label file, then write their rows (ids, label class, labelled_at, file rank) into ``target``.

    Every file is checked before anything is written, so one bad file applies none of them.
    """
    files = label_files(workspace)
    opened = [check_label_file(path, id_columns, label_column) for path in files]
    schema = None
    rows = 0
    with storage.staged_path(target) as tmp:
        writer = None
        try:
            for rank, (path, parquet) in enumerate(zip(files, opened, strict=True)):
                columns = [*id_columns, label_column] + (
                    [LABELLED_AT] if LABELLED_AT in parquet.schema_arrow.names else []
                )
                try:
                    for batch in parquet.iter_batches(columns=columns, batch_size=262_144):
                        table = _labelled_rows(batch, id_columns, label_column, normal_label, rank)
                        if schema is None:
                            schema = table.schema
                            writer = pq.ParquetWriter(tmp, schema)
                        writer.write_table(table.cast(schema))
                        rows += table.num_rows
                except (pa.ArrowException, OSError) as exc:
                    raise read_error(path, exc, "label file could not be read", "unreadable") from exc
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pq.write_table(
                pa.table(
                    {
                        **{c: pa.array([], pa.int64()) for c in id_columns},
                        LABEL_CLASS: pa.array([], pa.int8()),
                        LABELLED_AT: pa.array([], pa.timestamp("us", tz="UTC")),
                        FILE_RANK: pa.array([], pa.int32()),
                    }
                ),
                tmp,
            )
    return {"files": [str(p) for p in files], "rows": rows}


def _labelled_rows(
    batch: pa.RecordBatch, id_columns: Sequence[str], label_column: str, normal_label: str, rank: int
) -> pa.Table:
    n = batch.num_rows
    labelled_at = (
        batch.column(LABELLED_AT).cast(pa.timestamp("us", tz="UTC"))
        if LABELLED_AT in batch.schema.names
        else pa.nulls(n, pa.timestamp("us", tz="UTC"))
    )
    return pa.table({
        **{c: batch.column(c) for c in id_columns},
        LABEL_CLASS: pa.array(label_classes(batch.column(label_column), normal_label), pa.int8()),
        LABELLED_AT: labelled_at,
        FILE_RANK: pa.array([rank] * n, pa.int32()),
    })


def dates_ending(last: dt.date, days: int) -> list[dt.date]:
    """Return the ``days`` dates up to and including ``last``, oldest first."""
    return [last - dt.timedelta(days=back) for back in range(days - 1, -1, -1)]


def quoted(name: str) -> str:
    """Return a column name quoted for DuckDB SQL."""
    return '"' + name.replace('"', '""') + '"'


def connect_with_latest_labels(workspace: Workspace, staged_labels: str, id_columns: Sequence[str]) -> Any:
    """Open a DuckDB connection holding ``latest``: each labelled row's latest label class.

    The connection is memory-limited and spills under state/tmp/, or the spool for object storage.
    """
    import duckdb

    spill = storage.make_dir(storage.local_work_dir(workspace.state_dir / "tmp") / "duckdb")
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory = '{str(spill)}'")
    con.execute("SET preserve_insertion_order = false")
    ids = ", ".join(quoted(c) for c in id_columns)
    # Ids are kept as text, so that a label file holding 42 labels the row whose id was written as "42", and back.
    as_text = ", ".join(f"CAST({quoted(c)} AS VARCHAR) AS {quoted(c)}" for c in id_columns)
    # The newest labelled_at wins, then the file modified last.
    con.execute(
        f"CREATE TEMP TABLE latest AS SELECT {as_text}, {LABEL_CLASS} FROM read_parquet(?) WHERE {LABEL_CLASS} >= 0 "
        f"QUALIFY row_number() OVER (PARTITION BY {ids} ORDER BY {LABELLED_AT} DESC NULLS LAST, {FILE_RANK} DESC) = 1",
        storage.register_with_duckdb(con, [staged_labels]),
    )
    return con


def join_on_ids(left: str, id_columns: Sequence[str]) -> str:
    """Return the condition joining table alias ``left`` to ``latest`` (alias l) on the id columns, compared as text."""
    return " AND ".join(f"CAST({left}.{quoted(c)} AS VARCHAR) = l.{quoted(c)}" for c in id_columns)
