"""Nightly scoring flow: score the batches of a date with the current model and report on them."""

from __future__ import annotations

import datetime as dt
import os
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from data.errors import AnomalyJobError
from data.locks import scoring_lock
from data.workspace import Workspace, default_workspace, resolve_run_date
from models.reports import anomaly_class_metrics
from models.scoring import batch_report_dir, describe_failure
from tasks.reporting import publish_report_artifacts, write_evaluation_report
from tasks.scoring import (
    already_scored,
    find_batches,
    record_rejected_batch,
    record_scored_batch,
    remove_stale_temporaries,
    resolve_model_version,
    score_batch,
    summarize_run,
)

DEFAULT_TIMEZONE = os.environ.get("ANOMALY_TIMEZONE", "UTC")


class BatchesFailedError(AnomalyJobError):
    """Some batches of a run could not be scored; the others were, and ``outcome`` summarises the run."""

    def __init__(self, message: str, outcome: dict[str, Any]):
        super().__init__(message)
        self.outcome = outcome


def _run_name() -> str:
    parameters = flow_run.parameters or {}
    return f"score-{parameters.get('run_date') or 'today'}"


@flow(name="score-batches", flow_run_name=_run_name, timeout_seconds=4 * 3600)
def score_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    run_date: Annotated[dt.date | None, Field(json_schema_extra={"title": "Run date"})] = None,
    batch_paths: Annotated[list[str] | None, Field(json_schema_extra={"title": "Batch paths"})] = None,
    force: Annotated[bool, Field(json_schema_extra={"title": "Force re-scoring"})] = False,
    write_scores: Annotated[bool, Field(json_schema_extra={"title": "Write every row's score"})] = True,
    model_version: Annotated[Annotated[str, Field(min_length=1)] | None, Field(json_schema_extra={"title": "Model version"})] = None,
    timezone: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Time zone"})] = DEFAULT_TIMEZONE,
    chunk_rows: Annotated[int, Field(ge=1024, le=10_000_000, json_schema_extra={"title": "Rows per chunk"})] = 131_072,
    max_bad_row_share: Annotated[float, Field(ge=0, le=1, json_schema_extra={"title": "Maximum share of bad rows"})] = 0.1,
) -> dict[str, Any]:
    """Score the Parquet batches of one date with the current model; write flagged rows, scores and reports.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/).
        run_date: Date whose batches (incoming/<date>/) are scored and under which outputs are partitioned. Empty means today in the time zone below.
        batch_paths: Explicit Parquet files, folders or globs to score instead of incoming/<date>/.
        force: Score batches again even if the current model already scored them.
        write_scores: Also write every row's score (outputs/scores/) for joining back.
        model_version: Model version to score with. Empty means the current one (models/current.json).
        timezone: IANA time zone that decides what 'today' is, e.g. UTC or Europe/Paris.
        chunk_rows: Rows read and scored at a time; bounds memory whatever the file size.
        max_bad_row_share: Share of rows with missing or infinite features above which a batch fails instead of being scored.
    """
    logger = get_run_logger()
    date = resolve_run_date(run_date, timezone)
    scored_at = dt.datetime.now(dt.UTC)
    ws = Workspace.at(workspace)
    root = os.fspath(ws.root)

    # Step 1: which model, which batches.
    model = resolve_model_version(root, model_version)
    version = model["model_version"]
    found = find_batches(root, date, list(batch_paths or []))
    logger.info("Scoring %d batch(es) of %s with model %s (threshold %.6g)", len(found), date, version, model["threshold"])

    # Step 2: score each batch under the date's lock, so a second run of the date waits and then skips
    # what this one scored; one bad file does not stop the others.
    scored, skipped, failed = [], [], []
    report_dir = os.fspath(batch_report_dir(ws, date))
    with scoring_lock(ws, date):
        remove_stale_temporaries(root, date)
        for i, batch in enumerate(found, start=1):
            if not force and already_scored(root, date, batch, version):
                logger.info("[%d/%d] %s already scored by model %s; skipped (force=True to redo)", i, len(found), batch["name"], version)
                skipped.append(batch["name"])
                continue
            logger.info("[%d/%d] scoring %s", i, len(found), batch["path"])
            state = score_batch(root, date, batch, version, write_scores, chunk_rows, max_bad_row_share, scored_at, return_state=True)
            if state.is_failed():
                rejection = describe_failure(state.result(raise_on_failure=False), batch["path"])
                logger.error("Batch %s failed and is not marked scored: %s", batch["name"], rejection["error"])
                record_rejected_batch(root, date, batch, rejection)
                failed.append({"batch": batch["name"], **rejection})
                continue
            result = state.result()
            write_evaluation_report(result["summary"], report_dir, batch["name"], f"Batch {batch['name']} ({date})", {"batch": batch["name"], "source": batch["path"], "model_version": version, "date": date.isoformat()})
            record_scored_batch(root, date, batch, version, result)
            scored.append(result)

        # Step 3: the run report covers every batch of the date scored by this model, and every failure.
        summary = summarize_run(root, date, [r["batch"] for r in scored] + skipped, version)
        summary["failed_batches"] = failed
        context = {"date": date.isoformat(), "model_version": version, "batches_scored": len(scored), "batches_skipped": len(skipped), "batches_failed": len(failed)}
        report_paths = write_evaluation_report(summary, os.fspath(ws.output_partition("reports", date)), "run-report", f"Scoring run {date}, model {version}", context)

    with open(report_paths["markdown"], encoding="utf-8") as handle:
        markdown = handle.read()
    table = [
        {"batch": r["batch"], "rows_read": r["rows_read"], "rows_scored": r["rows_scored"], "rows_flagged": r["rows_flagged"], "rows_quarantined": r["rows_quarantined"], "flag_rate": round(r["summary"]["flag_rate"], 6), "error": None}
        for r in scored
    ] + [{"batch": f["batch"], "rows_read": 0, "rows_scored": 0, "rows_flagged": 0, "rows_quarantined": 0, "flag_rate": None, "error": f["error"]} for f in failed]
    publish_report_artifacts(f"scoring-report-{date.isoformat()}", markdown, table, f"Scoring run of {date} with model {version}")

    outcome = {
        "date": date.isoformat(),
        "model_version": version,
        "threshold": model["threshold"],
        "batches_scored": len(scored),
        "batches_skipped": len(skipped),
        "batches_failed": len(failed),
        "rows_read": summary["rows_read"],
        "rows_scored": summary["rows_scored"],
        "rows_flagged": summary["rows_flagged"],
        "rows_quarantined": summary["rows_quarantined"],
        "flag_rate": summary["flag_rate"] if summary["rows_scored"] else None,
        "expected_flag_rate": summary["expected_flag_rate"],
        **anomaly_class_metrics(summary),
        "flagged_dir": os.fspath(ws.output_partition("flagged", date)),
        "scores_dir": os.fspath(ws.output_partition("scores", date)) if write_scores else None,
        "report": report_paths["markdown"],
        "report_json": report_paths["json"],
        "failed": failed,
    }
    if failed:
        names = "; ".join(f["error"] for f in failed)
        raise BatchesFailedError(f"{len(failed)} of {len(found)} batch(es) failed and were not marked scored: {names}", outcome)
    return outcome
