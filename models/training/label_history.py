"""Past nights' rows that later labels confirm, as extra training data: normal rows to learn from, anomalies to test on.

The nights' incoming files are joined to the latest labels by id in DuckDB, out of core. Rows with an
infinite feature are left out, as training refuses them; so are rows with a missing one unless missing
values are filled (otherwise they were quarantined when they were scored).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from pathlib import Path

from data import storage
from data.errors import TrainingDataError
from data.labels import STAGED_LABELS, connect_with_latest_labels, dates_ending, join_on_ids, quoted, stage_labels
from data.parquet import (
    FILL_MISSING,
    LabelRule,
    MissingValues,
    feature_candidates,
    is_text_type,
    open_parquet,
    resolve_parquet_files,
)
from data.workspace import Workspace
from models.training.results import ConfirmedRows

CONFIRMED_ANOMALY = "confirmed anomaly"


def gather_label_history(
    workspace_root: str,
    end_date: dt.date,
    days: int,
    id_columns: Sequence[str],
    feature_names: Sequence[str],
    labels: LabelRule,
    staged_labels: str,
    target: Path,
    text_columns: Collection[str] = (),
    missing_values: MissingValues = FILL_MISSING,
) -> ConfirmedRows:
    """Write the labelled rows of the ``days`` nights up to ``end_date`` to ``target``; return counts by date.

    Each row is written with its features (``text_columns`` among them as text) and label; a row with a
    missing feature only where ``missing_values`` fills them.
    """
    label_column, normal_label = labels.column, labels.normal
    workspace = Workspace.at(workspace_root)
    dates = dates_ending(end_date, days)
    files = {date: storage.list_files(workspace.incoming_for(date), "*.parquet", recursive=True) for date in dates}
    files = {date: found for date, found in files.items() if found}
    # Text columns (categorical features) are kept as text.
    features = ", ".join(
        f"CAST(i.{quoted(name)} AS {_sql_type(name, text_columns)}) AS {quoted(name)}" for name in feature_names
    )
    filling = missing_values == FILL_MISSING
    checks = []
    for name in feature_names:
        column = f"i.{quoted(name)}"
        if name not in text_columns:
            # Filled, a null or NaN is kept and only an infinite value refused; otherwise isfinite refuses
            # all three (it is null for a null, which the WHERE clause leaves out).
            number = f"CAST({column} AS DOUBLE)"
            checks.append(f"NOT coalesce(isinf({number}), false)" if filling else f"isfinite({number})")
        elif not filling:
            checks.append(f"{column} IS NOT NULL")
    usable = " AND ".join(checks or ["true"])
    con = connect_with_latest_labels(workspace, staged_labels, id_columns)
    try:
        paths = storage.register_with_duckdb(con, [p for found in files.values() for p in found])
        if paths:
            # Each file's night comes from its folder: incoming/<YYYY-MM-DD>/...
            con.execute(
                f"CREATE TEMP TABLE history AS SELECT {features}, "
                f"CASE WHEN l.label_class = 0 THEN $normal ELSE '{CONFIRMED_ANOMALY}' END AS {quoted(label_column)}, "
                "regexp_extract(i.filename, '/(\\d{4}-\\d{2}-\\d{2})/', 1) AS night "
                "FROM read_parquet($files, union_by_name = true, filename = true) "
                f"i JOIN latest l ON {join_on_ids('i', id_columns)} WHERE {usable}",
                {"files": paths, "normal": str(normal_label)},
            )
        else:
            con.execute(
                "CREATE TEMP TABLE history AS SELECT "
                f"{', '.join(f'NULL::{_sql_type(n, text_columns)} AS {quoted(n)}' for n in feature_names)}, "
                f"''::VARCHAR AS {quoted(label_column)}, ''::VARCHAR AS night WHERE false"
            )
        by_night = con.execute(
            f"SELECT night, count(*) FILTER ({quoted(label_column)} = $normal), count(*) "
            f"FILTER ({quoted(label_column)} <> $normal) FROM history GROUP BY night ORDER BY night",
            {"normal": str(normal_label)},
        ).fetchall()
        with storage.staged_path(target, suffix=".parquet") as tmp:
            con.execute(f"COPY (SELECT * EXCLUDE (night) FROM history) TO '{str(tmp)}' (FORMAT parquet)")
    finally:
        con.close()
    return ConfirmedRows(
        path=str(target),
        first_date=dates[0].isoformat(),
        last_date=end_date.isoformat(),
        nights_with_files=len(files),
        rows_confirmed_normal=int(sum(n for _, n, _ in by_night)),
        rows_confirmed_anomalous=int(sum(a for _, _, a in by_night)),
        by_night=[
            {"date": night, "confirmed_normal": int(n), "confirmed_anomalous": int(a)} for night, n, a in by_night
        ],
    )


def _sql_type(name: str, text_columns: Collection[str]) -> str:
    return "VARCHAR" if name in text_columns else "DOUBLE"


def label_history_for_training(
    workspace_root: str,
    training_source: str,
    labels: LabelRule,
    end_date: dt.date,
    days: int,
    id_columns: Sequence[str],
    work_dir: Path,
    missing_values: MissingValues = FILL_MISSING,
) -> ConfirmedRows:
    """Check the labels, then gather the confirmed rows of the last ``days`` nights into ``work_dir``.

    The rows keep the training data's features; those with missing values only where ``missing_values`` fills them.
    """
    workspace = Workspace.at(workspace_root)
    files = resolve_parquet_files(training_source)
    if not files:
        raise TrainingDataError(f"training_data={training_source!r}: no .parquet files found there")
    # Every column that may be a feature: retraining then picks the ones it keeps, categorical ones included.
    schema = open_parquet(files[0]).schema_arrow
    feature_names = feature_candidates(schema, labels.column)
    text_columns = {name for name in feature_names if is_text_type(schema.field(name).type)}
    staged = work_dir / STAGED_LABELS
    stage_labels(workspace, id_columns, labels.column, labels.normal, staged)
    return gather_label_history(
        workspace_root,
        end_date,
        days,
        id_columns,
        feature_names,
        labels,
        str(staged),
        work_dir / "label-history.parquet",
        text_columns,
        missing_values,
    )
