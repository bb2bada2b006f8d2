"""Nightly scoring flow: score the batches of a date with the current model and report on them."""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from pydantic import BeforeValidator, Field

from data import storage
from data.batches import Batch
from data.errors import AnomalyJobError
from data.locks import LockBusyError, scoring_lock
from data.output_schema import MAX_REASONS
from data.parquet import DEFAULT_CHUNK_ROWS, DEFAULT_MAX_BAD_ROW_SHARE
from data.workspace import Workspace, default_workspace, resolve_run_date
from flows.fanout import Work, score_work
from flows.parameters import DEFAULT_TIMEZONE, RUN_DATE_SCHEMA, empty_means_today
from models.monitoring.drift import with_alarm
from models.scoring.batch import BatchResult, ModelFacts
from models.scoring.run_summary import ScoringRun
from models.scoring.streaming import ScoringOptions
from tasks.events import emit_night_events
from tasks.reporting import publish_report_artifacts, write_evaluation_report
from tasks.scoring import (
    find_already_scored,
    find_batches,
    find_late_batches,
    publish_scored_batches,
    reject_batch,
    remove_stale_temporaries,
    resolve_model_version,
    summarize_date,
    withdraw_records,
)


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
    run_date: Annotated[
        dt.date | None,
        BeforeValidator(empty_means_today),
        RUN_DATE_SCHEMA,
        Field(json_schema_extra={"title": "Run date", "default": ""}),
    ] = None,
    batch_paths: Annotated[list[str] | None, Field(json_schema_extra={"title": "Batch paths"})] = None,
    force: Annotated[bool, Field(json_schema_extra={"title": "Force re-scoring"})] = False,
    write_scores: Annotated[bool, Field(json_schema_extra={"title": "Write every row's score"})] = True,
    model_version: Annotated[
        Annotated[str, Field(min_length=1)] | None, Field(json_schema_extra={"title": "Model version"})
    ] = None,
    timezone: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Time zone"})] = DEFAULT_TIMEZONE,
    catch_up_days: Annotated[
        int, Field(ge=0, le=31, json_schema_extra={"title": "Days of late files to catch up"})
    ] = 3,
    reason_count: Annotated[
        int, Field(ge=0, le=MAX_REASONS, json_schema_extra={"title": "Reasons per flagged row"})
    ] = 3,
    chunk_rows: Annotated[
        int, Field(ge=1024, le=10_000_000, json_schema_extra={"title": "Rows per chunk"})
    ] = DEFAULT_CHUNK_ROWS,
    max_bad_row_share: Annotated[
        float, Field(ge=0, le=1, json_schema_extra={"title": "Maximum share of bad rows"})
    ] = DEFAULT_MAX_BAD_ROW_SHARE,
    dask_address: Annotated[str | None, Field(json_schema_extra={"title": "Dask scheduler address"})] = None,
    dask_workers: Annotated[int, Field(ge=0, le=1024, json_schema_extra={"title": "Local Dask workers"})] = 0,
    dask_threads_per_worker: Annotated[
        int, Field(ge=1, le=256, json_schema_extra={"title": "Threads per Dask worker"})
    ] = 1,
    rows_per_unit: Annotated[int, Field(ge=10_000, json_schema_extra={"title": "Rows per work unit"})] = 1_000_000,
) -> dict[str, Any]:
    """Score the Parquet batches of one date with the current model; write flagged rows, scores and reports.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/);
            the default comes from $ANOMALY_WORKSPACE, else ./workspace.
        run_date: Date whose batches (incoming/YYYY-MM-DD/) are scored and under which outputs are partitioned.
            Empty or not given means today in the time zone below.
        batch_paths: Explicit Parquet files, folders or globs to score instead of incoming/YYYY-MM-DD/.
        force: Score batches again even if the current model already scored them.
        write_scores: Also write every row's score (outputs/scores/) for joining back.
        model_version: Model version to score with. Empty or not given means the current one
            (models/current.json).
        timezone: IANA time zone that decides what 'today' is, e.g. UTC or Europe/Paris; the default comes from
            $ANOMALY_TIMEZONE, else UTC.
        catch_up_days: Also score files of this many earlier dates that have no record yet (late arrivals, files
            replaced after a rejection), under their own dates; 0 turns it off.
        reason_count: How many features each flagged row names as its reasons (reason_1..k, with share and
            direction); 0 writes none.
        chunk_rows: Rows read and scored at a time; bounds memory whatever the file size.
        max_bad_row_share: Share of rows with missing or infinite features above which a batch fails instead of
            being scored.
        dask_address: Address of an existing Dask scheduler (e.g. tcp://10.0.0.5:8786) to score on.
            Empty or not given means $ANOMALY_DASK_ADDRESS, or no Dask.
        dask_workers: Start a local Dask cluster with this many worker processes for the run;
            0 scores in this process.
        dask_threads_per_worker: Threads of each local Dask worker
            (TensorFlow in each worker is limited to them).
        rows_per_unit: Rows of a work unit: small files are scored together in groups of about this many
            rows, one task each; on Dask a larger file is split into units of whole row groups of about this
            many rows, so no worker holds a whole large file.
    """
    logger = get_run_logger()
    date = resolve_run_date(run_date, timezone)
    scored_at = dt.datetime.now(dt.UTC)
    ws = Workspace.at(workspace)
    root = str(ws.root)
    model = resolve_model_version(root, model_version)
    found = find_batches(root, date, list(batch_paths or []))
    logger.info(
        "Scoring %d batch(es) of %s with model %s (threshold %.6g)", len(found), date, model.version, model.threshold
    )

    with contextlib.ExitStack() as locks:
        # Under the date's lock a second run of the date waits, then skips what this one scored; earlier
        # dates are caught up only where no other run holds their lock.
        locks.enter_context(scoring_lock(ws, date))
        late_dates = [] if batch_paths else _lock_earlier_dates(ws, date, catch_up_days, locks)
        for day in [date, *late_dates]:
            remove_stale_temporaries(root, day)
        work, skipped, late = _choose_work(
            root=root, date=date, found=found, late_dates=late_dates, version=model.version, force=force
        )
        # Withdrawn before any output is replaced: a run killed from here on leaves these batches to the next run.
        withdraw_records(root, work)
        options = ScoringOptions(
            scored_at=scored_at,
            write_scores=write_scores,
            chunk_rows=chunk_rows,
            reason_count=reason_count,
            max_bad_row_share=max_bad_row_share,
        )
        outcomes = score_work(
            root=root,
            work=work,
            version=model.version,
            options=options,
            dask_address=dask_address,
            dask_workers=dask_workers,
            threads_per_worker=dask_threads_per_worker,
            rows_per_unit=rows_per_unit,
        )
        run = _publish_batches(
            root=root, date=date, model=model, work=work, outcomes=outcomes, skipped=skipped, late=late
        )
        summary, report_paths = _write_run_reports(ws=ws, run=run)

    publish_report_artifacts(
        key=f"scoring-report-{date.isoformat()}",
        markdown=storage.read_text(report_paths["markdown"]),
        table=run.artifact_rows(),
        description=f"Scoring run of {date} with model {model.version}",
    )
    outcome = run.outcome(summary=summary, report_paths=report_paths, workspace=ws, write_scores=write_scores)
    emit_night_events(workspace_root=root, outcome=outcome)
    if run.failed:
        names = "; ".join(f["error"] for f in run.failed)
        raise BatchesFailedError(
            f"{len(run.failed)} of {len(work)} batch(es) failed and were not published: {names}", outcome
        )
    return outcome


def _choose_work(
    root: str, date: dt.date, found: list[Batch], late_dates: list[dt.date], version: str, force: bool
) -> tuple[Work, list[str], Work]:
    """Return the (date, batch) pairs to score, the batches skipped as already scored, and the late files.

    The late files are among the pairs to score.
    """
    logger = get_run_logger()
    done = [] if force else find_already_scored(workspace_root=root, run_date=date, found=found, model_version=version)
    if done:
        logger.info(
            "%d batch(es) already scored by model %s; skipped (force=True to redo): %s",
            len(done), version, [b.name for b in done[:20]] + (["..."] if len(done) > 20 else []),
        )
    skipped = [batch.name for batch in done]
    skip = set(skipped)
    work: Work = [(date, batch) for batch in found if batch.name not in skip]
    late = [(day, batch) for day in late_dates for batch in find_late_batches(root, day)]
    if late:
        logger.info("Catching up %d late file(s) of earlier dates: %s", len(late), [f"{d}/{b.name}" for d, b in late])
    return work + late, skipped, late


def _publish_batches(
    root: str,
    date: dt.date,
    model: ModelFacts,
    work: Work,
    outcomes: list[BatchResult | dict[str, Any]],
    skipped: list[str],
    late: Work,
) -> ScoringRun:
    """Publish the scored batches (each one's report, then its manifest record, last); withdraw and record failures."""
    logger = get_run_logger()
    scored = [outcome for outcome in outcomes if isinstance(outcome, BatchResult)]
    failed: list[dict[str, Any]] = []
    for (day, batch), outcome in zip(work, outcomes, strict=True):
        if not isinstance(outcome, BatchResult):
            logger.error("Batch %s of %s failed and is not published: %s", batch.name, day, outcome["error"])
            reject_batch(root, day, batch, outcome)
            failed.append({"date": day.isoformat(), "batch": batch.name, **outcome})
    # Quoted: Prefect would otherwise walk every number of every batch's summary looking for futures.
    unpublished = publish_scored_batches(workspace_root=root, results=quote(scored), model_version=model.version)
    failed += unpublished
    left_out = {(f["date"], f["batch"]) for f in unpublished}
    scored = [r for r in scored if (r.run_date.isoformat(), r.batch) not in left_out]
    caught_up = [{"date": d.isoformat(), "batch": b.name} for d, b in late]
    return ScoringRun(date, model.version, model.threshold, scored, skipped, failed, caught_up)


def _write_run_reports(ws: Workspace, run: ScoringRun) -> tuple[dict[str, Any], dict[str, str]]:
    """Write the run report of the run's date and of each earlier date that got late files.

    Return the run date's summary and report paths. A run report covers every batch of its date this model
    published, and this run's failures.
    """
    reports = {}
    for day in run.dates_reported():
        summary = summarize_date(str(ws.root), day, run.model_version)
        summary["failed_batches"] = [f for f in run.failed if f["date"] == day.isoformat()]
        with_alarm(summary)
        if day == run.date:
            summary["catch_up_batches"] = run.caught_up
        title = f"Scoring run {day}, model {run.model_version}"
        reports[day] = (
            summary,
            write_evaluation_report(
                summary, str(ws.output_partition("reports", day)), "run-report", title, run.report_context(day)
            ),
        )
    return reports[run.date]


def _lock_earlier_dates(workspace: Workspace, date: dt.date, days: int, locks: contextlib.ExitStack) -> list[dt.date]:
    """Take the scoring locks of the ``days`` dates before ``date`` that no other run holds; return those dates."""
    logger = get_run_logger()
    held = []
    for back in range(1, days + 1):
        day = date - dt.timedelta(days=back)
        if not storage.is_dir(workspace.incoming_for(day)):
            continue
        try:
            locks.enter_context(scoring_lock(workspace, day, timeout_s=0))
        except LockBusyError:
            logger.info("Another run is scoring %s; its late files are left to it", day)
            continue
        held.append(day)
    return held
