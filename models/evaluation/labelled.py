"""Realised quality of past nights: later labels joined to the scores outputs by id, per scored date and model version.

The join runs in DuckDB over the Parquet files, one date at a time, with a memory limit and a spill
folder, so a long history never sits in one process's memory; only a night's labelled rows come back
to compute the metrics, with scikit-learn.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from data import storage
from data.evaluations import write_evaluation
from data.labels import LABEL_CLASS, connect_with_latest_labels, join_on_ids
from data.parquet import ANOMALY
from data.workspace import Workspace
from models.bundle import current_version, read_bundle_json
from models.evaluation.reports import plot_trend, render_markdown, write_report_files

RECALL_UNKNOWN = "only flagged rows are labelled: recall (and F1, ROC-AUC, PR-AUC) cannot be known"



class LabelledRows(NamedTuple):
    """A night's labelled rows of one model version: their errors, which were flagged, and which are anomalies."""

    errors: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray


def label_rule(workspace_root: str) -> dict[str, str]:
    """Return the current model's label column and normal value (from bundle.json; the model itself is not loaded)."""
    workspace = Workspace.at(workspace_root)
    version = current_version(workspace.models_dir)
    metadata = read_bundle_json(workspace.version_dir(version))
    return {
        "model_version": version,
        "label_column": str(metadata.get("label_column", "label")),
        "normal_label": str(metadata.get("normal_label", "0")),
    }


def evaluate_dates(
    workspace_root: str, dates: Sequence[dt.date], id_columns: Sequence[str], staged_labels: str, progress: Any = None
) -> list[dict[str, Any]]:
    """Evaluate each date that has scores outputs against the latest labels; return every row written.

    Each date's evaluation is written as Parquet and JSON.
    """
    workspace = Workspace.at(workspace_root)
    con = connect_with_latest_labels(workspace, staged_labels, id_columns)
    try:
        rows: list[dict[str, Any]] = []
        evaluated_at = dt.datetime.now(dt.UTC)
        for date in dates:
            files = storage.list_files(workspace.output_partition("scores", date), "*.parquet")
            if not files:
                continue
            date_rows = _evaluate_date(
                con, storage.register_with_duckdb(con, files), join_on_ids("s", id_columns), date, evaluated_at
            )
            write_evaluation(workspace, date, date_rows)
            rows += date_rows
            if progress is not None:
                progress(date, date_rows)
        return rows
    finally:
        con.close()


def _evaluate_date(
    con: Any, files: list[str], on_ids: str, date: dt.date, evaluated_at: dt.datetime
) -> list[dict[str, Any]]:
    joined = (
        f"(SELECT s.model_version, s.reconstruction_error, s.is_anomaly, l.{LABEL_CLASS} FROM read_parquet($files) s "
        f"LEFT JOIN latest l ON {on_ids})"
    )
    counts = con.execute(
        f"SELECT model_version, count(*), count(*) FILTER (is_anomaly), count({LABEL_CLASS}) FILTER (is_anomaly), "
        f"count({LABEL_CLASS}) FILTER (NOT is_anomaly) "
        f"FROM {joined} GROUP BY model_version ORDER BY model_version",
        {"files": files},
    ).fetchall()
    labelled = con.sql(
        f"SELECT model_version, reconstruction_error, is_anomaly, {LABEL_CLASS} FROM {joined} "
        f"WHERE {LABEL_CLASS} IS NOT NULL",
        params={"files": files},
    ).to_arrow_table()
    versions = np.asarray(labelled.column("model_version").to_pylist(), dtype=object)
    rows = []
    for version, scored, flagged, labelled_flagged, labelled_unflagged in counts:
        mine = versions == version
        rows.append(
            quality_row(
                date,
                str(version),
                int(scored),
                int(flagged),
                int(labelled_flagged),
                int(labelled_unflagged),
                LabelledRows(
                    errors=labelled.column("reconstruction_error").to_numpy()[mine],
                    predicted=labelled.column("is_anomaly").to_numpy(zero_copy_only=False)[mine],
                    truth=labelled.column(LABEL_CLASS).to_numpy()[mine] == ANOMALY,
                ),
                evaluated_at,
            )
        )
    return rows


def quality_row(
    date: dt.date,
    version: str,
    scored: int,
    flagged: int,
    labelled_flagged: int,
    labelled_unflagged: int,
    rows: LabelledRows,
    evaluated_at: dt.datetime,
) -> dict[str, Any]:
    """Return the realised quality of a date and model version from its labelled rows; None where labels cannot tell."""
    errors, predicted, truth = rows
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    notes = []
    precision = recall = f1 = roc_auc = pr_auc = None
    if labelled_flagged:
        precision = float(precision_score(truth, predicted, zero_division=0))
    recall_known = labelled_unflagged > 0
    if not recall_known and labelled_flagged:
        notes.append(RECALL_UNKNOWN)
    elif recall_known and not truth.any():
        notes.append("no labelled row is an anomaly: recall is undefined")
    elif recall_known:
        recall = float(recall_score(truth, predicted, zero_division=0))
        if precision is not None:
            f1 = float(f1_score(truth, predicted, zero_division=0))
        if truth.all():
            notes.append("every labelled row is an anomaly: ROC-AUC and PR-AUC are undefined")
        else:
            roc_auc = float(roc_auc_score(truth, errors))
            pr_auc = float(average_precision_score(truth, errors))
        if labelled_unflagged < scored - flagged:
            notes.append("unflagged rows are only partly labelled: recall holds if they were labelled at random")
    if not len(truth):
        notes.append("no labels yet")
    return {
        # Not "date": that is the Hive partition key the folder already gives readers of the dataset.
        "scored_date": date.isoformat(),
        "model_version": version,
        "rows_scored": scored,
        "rows_flagged": flagged,
        "flag_rate": flagged / scored if scored else None,
        "rows_labelled": int(len(truth)),
        "labelled_anomalies": int(truth.sum()),
        "label_coverage_flagged": labelled_flagged / flagged if flagged else None,
        "label_coverage_unflagged": labelled_unflagged / (scored - flagged) if scored > flagged else None,
        "recall_known": recall_known,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "note": "; ".join(notes) or None,
        "evaluated_at": evaluated_at.isoformat(),
    }


def write_trend_report(workspace: Workspace, rows: list[dict[str, Any]], title: str) -> dict[str, str]:
    """Write the trend report (JSON, Markdown, PNG: precision, recall, flag rate over dates, model changes marked)."""
    folder = workspace.outputs_dir / "reports" / "evaluation-trend"
    png = plot_trend(rows, folder / "evaluation-trend.png", title)
    table = [
        {
            k: row[k]
            for k in (
                "scored_date",
                "model_version",
                "rows_scored",
                "flag_rate",
                "rows_labelled",
                "label_coverage_flagged",
                "label_coverage_unflagged",
                "precision",
                "recall",
                "f1",
                "roc_auc",
            )
        }
        | {"note": row["note"] or ""}
        for row in rows
    ]
    markdown = render_markdown(
        title,
        {"Realised quality by scored date and model version": table or "No scored dates with outputs in the window."},
        [str(png)],
    )
    return {
        **write_report_files({"title": title, "rows": rows}, markdown, folder, "evaluation-trend"),
        "png": str(png),
        "text": markdown,
    }
