"""The realised-quality evaluations: one Parquet file and its JSON twin per scored date under outputs/evaluation/."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data import storage
from data.workspace import Workspace

EVALUATION_FILE = "evaluation"
# Readers of outputs/evaluation/ as one Hive-partitioned dataset (pyarrow, pandas, Spark) skip files
# whose names start with "_": the JSON twin sits beside the Parquet file without breaking them.
EVALUATION_JSON = "_evaluation.json"
EVALUATION_SCHEMA = pa.schema([
    ("scored_date", pa.string()),
    ("model_version", pa.string()),
    ("rows_scored", pa.int64()),
    ("rows_flagged", pa.int64()),
    ("flag_rate", pa.float64()),
    ("rows_labelled", pa.int64()),
    ("labelled_anomalies", pa.int64()),
    ("label_coverage_flagged", pa.float64()),
    ("label_coverage_unflagged", pa.float64()),
    ("recall_known", pa.bool_()),
    ("precision", pa.float64()),
    ("recall", pa.float64()),
    ("f1", pa.float64()),
    ("roc_auc", pa.float64()),
    ("pr_auc", pa.float64()),
    ("note", pa.string()),
    ("evaluated_at", pa.string()),
])


def write_evaluation(workspace: Workspace, date: dt.date, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Write (replacing) a date's evaluation as Parquet and JSON under outputs/evaluation/date=<date>/."""
    folder = workspace.output_partition("evaluation", date)
    target = folder / f"{EVALUATION_FILE}.parquet"
    with storage.staged_path(target) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=EVALUATION_SCHEMA), tmp)
    json_path = storage.write_json(folder / EVALUATION_JSON, {"date": date.isoformat(), "by_model_version": rows})
    return {"parquet": str(target), "json": str(json_path)}


def read_evaluations(workspace: Workspace, dates: Sequence[dt.date]) -> list[dict[str, Any]]:
    """Return the evaluation rows written for ``dates``, oldest first."""
    rows = []
    for date in sorted(dates):
        payload = storage.read_json_if_present(workspace.output_partition("evaluation", date) / EVALUATION_JSON)
        if payload:
            rows += payload["by_model_version"]
    return rows
