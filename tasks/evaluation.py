"""Tasks of the evaluation flow: stage the labels, evaluate the scored dates, write the trend report."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import labels
from data.evaluations import read_evaluations
from data.workspace import Workspace
from models.evaluation import labelled
from tasks.common import RETRIES


@task(name="read-label-rule", cache_policy=NO_CACHE, **RETRIES)
def read_label_rule(workspace_root: str) -> dict[str, str]:
    """Return the current model's label column and normal value, which label files follow."""
    return labelled.label_rule(workspace_root)


@task(name="stage-labels", cache_policy=NO_CACHE, **RETRIES)
def stage_labels(workspace_root: str, id_columns: list[str], label_column: str, normal_label: str) -> dict[str, Any]:
    """Check every label file and gather their rows into one Parquet file under state/; return its path and counts."""
    workspace = Workspace.at(workspace_root)
    target = workspace.state_dir / "labels" / labels.STAGED_LABELS
    staged = labels.stage_labels(workspace, id_columns, label_column, normal_label, target)
    get_run_logger().info(
        "%d label row(s) from %d file(s) in %s", staged["rows"], len(staged["files"]), labels.labels_dir(workspace)
    )
    return {**staged, "path": str(target)}


@task(name="evaluate-dates", cache_policy=NO_CACHE, **RETRIES)
def evaluate_dates(
    workspace_root: str, dates: list[dt.date], id_columns: list[str], staged_labels: str
) -> list[dict[str, Any]]:
    """Join the labels to each date's scores and write its evaluation; return the rows written."""
    logger = get_run_logger()

    def progress(date: dt.date, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            logger.info(
                "%s, model %s: %d rows, %d labelled, precision %s, recall %s",
                date,
                row["model_version"],
                row["rows_scored"],
                row["rows_labelled"],
                row["precision"],
                row["recall"],
            )

    return labelled.evaluate_dates(workspace_root, dates, id_columns, staged_labels, progress)


@task(name="write-trend-report", cache_policy=NO_CACHE, **RETRIES)
def write_trend_report(workspace_root: str, dates: list[dt.date], title: str) -> dict[str, str]:
    """Write the trend report of the window's evaluations (JSON, Markdown, PNG)."""
    workspace = Workspace.at(workspace_root)
    return labelled.write_trend_report(workspace, read_evaluations(workspace, dates), title)

