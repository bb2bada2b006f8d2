"""Evaluation flow: join labels that arrived later to what was scored, per date and model version; report the trend."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import BeforeValidator, Field

from data.labels import dates_ending
from data.workspace import Workspace, default_workspace, resolve_run_date
from flows.parameters import DEFAULT_TIMEZONE, RUN_DATE_SCHEMA, empty_means_today
from tasks.evaluation import evaluate_dates, read_label_rule, stage_labels, write_trend_report
from tasks.reporting import publish_report_artifacts


@flow(name="evaluate-labels", flow_run_name="evaluate-{window_days}-days", timeout_seconds=2 * 3600)
def evaluate_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    end_date: Annotated[
        dt.date | None,
        BeforeValidator(empty_means_today),
        RUN_DATE_SCHEMA,
        Field(json_schema_extra={"title": "Last scored date", "default": ""}),
    ] = None,
    window_days: Annotated[int, Field(ge=1, le=3660, json_schema_extra={"title": "Days evaluated"})] = 30,
    id_columns: Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, json_schema_extra={"title": "Id columns"})
    ] = ["row_id"],  # noqa: B006 - Prefect copies parameters
    timezone: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Time zone"})] = DEFAULT_TIMEZONE,
) -> dict[str, Any]:
    """Join the labels in labels/ to the last dates' scores outputs and write their realised quality and its trend.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, labels/, models/, outputs/, state/);
            the default comes from $ANOMALY_WORKSPACE, else ./workspace.
        end_date: Last scored date evaluated. Empty or not given means today in the time zone below.
        window_days: How many scored dates, ending at the last one, are evaluated again
            (their evaluations are replaced).
        id_columns: Columns that identify a row in both the label files and the scores outputs.
        timezone: IANA time zone that decides what 'today' is, e.g. UTC or Europe/Paris; the default comes from
            $ANOMALY_TIMEZONE, else UTC.
    """
    logger = get_run_logger()
    last = resolve_run_date(end_date, timezone)
    dates = dates_ending(last, window_days)
    ws = Workspace.at(workspace)
    root = str(ws.root)
    # Labels are read with the current model's label column and normal value, as retraining reads them.
    rule = read_label_rule(root)
    staged = stage_labels(root, list(id_columns), rule["label_column"], rule["normal_label"])
    rows = evaluate_dates(root, dates, list(id_columns), staged["path"])
    title = f"Realised quality, {dates[0]} to {last}"
    trend = write_trend_report(root, dates, title)
    publish_report_artifacts(f"evaluation-trend-{last.isoformat()}", trend["text"], rows, title)
    logger.info(
        "Evaluated %d scored date(s) of %s..%s with %d label row(s)",
        len({r["scored_date"] for r in rows}),
        dates[0],
        last,
        staged["rows"],
    )
    return {
        "first_date": dates[0].isoformat(),
        "last_date": last.isoformat(),
        "dates_evaluated": sorted({r["scored_date"] for r in rows}),
        "label_files": len(staged["files"]),
        "label_rows": staged["rows"],
        "evaluations": rows,
        "evaluation_dir": str(ws.outputs_dir / "evaluation"),
        "trend_report": trend["markdown"],
    }
