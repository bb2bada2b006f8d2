"""Nightly scoring flow: score the batches of a date with the current model and report on them."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from typing import Annotated, Any

from distributed import KilledWorker
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture
from pydantic import BeforeValidator, Field

from data import storage
from data.batches import Batch
from data.errors import AnomalyJobError
from data.locks import LockBusyError, scoring_lock
from data.output_schema import MAX_REASONS
from data.workspace import Workspace, default_workspace, resolve_run_date
from flows.parameters import DEFAULT_TIMEZONE, RUN_DATE_SCHEMA, empty_means_today
from models.evaluation.reports import anomaly_class_metrics
from models.monitoring.drift import with_alarm
from models.scoring.batch import BatchResult, describe_failure
from tasks.events import emit_night_events
from tasks.reporting import publish_report_artifacts, write_evaluation_report
from tasks.scoring import (
    already_scored,
    discard_units,
    find_batches,
    find_late_batches,
    merge_units,
    plan_units,
    record_scored_batch,
    reject_batch,
    remove_stale_temporaries,
    resolve_model_version,
    score_batch,
    score_unit,
    summarize_date,
    withdraw_records,
    write_batch_report,
)

DASK_ADDRESS_ENV = "ANOMALY_DASK_ADDRESS"


class BatchesFailedError(AnomalyJobError):
    """Some batches of a run could not be scored; the others were, and ``outcome`` summarises the run."""

    def __init__(self, message: str, outcome: dict[str, Any]):
        super().__init__(message)
        self.outcome = outcome


def task_runner(dask_address: str | None, dask_workers: int, threads_per_worker: int) -> TaskRunner:
    """Return the task runner for a run: an existing Dask cluster, a local one, or one task at a time in this process."""
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    if dask_workers:
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": dask_workers,
                "threads_per_worker": threads_per_worker,
                "processes": True,
                "dashboard_address": None,
                # Read by models.runtime before TensorFlow starts, so workers do not fight over the cores.
                "env": {"ANOMALY_TF_THREADS": str(threads_per_worker)},
            }
        )
    return ThreadPoolTaskRunner(max_workers=1)


Work = list[tuple[dt.date, Batch]]


def _score_whole_files(runner: TaskRunner, root: str, work: Work, version: str, options: dict[str, Any]) -> list[State]:
    futures = [runner.submit(score_batch, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, **options}) for date, batch in work]
    return [_settled(f) for f in futures]


def _score_in_units(runner: TaskRunner, root: str, work: Work, version: str, options: dict[str, Any], rows_per_unit: int) -> list[State]:
    logger = get_run_logger()
    # Planning reads only file metadata: it runs here, and the workers hash the files as they finish them.
    plans = [plan_units(batch, rows_per_unit, return_state=True) for _, batch in work]
    unit_options = {"chunk_rows": options["chunk_rows"], "scored_at": options["scored_at"], "reason_count": options["reason_count"]}
    pending: list[list[PrefectFuture] | PrefectFuture | State] = []
    for (date, batch), plan in zip(work, plans, strict=True):
        if not plan.is_completed():
            pending.append(plan)
            continue
        units = plan.result().units
        logger.info("Batch %s: %d unit(s) of row groups", batch.name, len(units))
        if len(units) == 1:
            # A file small enough for one unit is scored straight into its outputs, with nothing to join.
            pending.append(runner.submit(score_batch, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, **options, "before": plan.result().before}))
            continue
        pending.append([
            runner.submit(score_unit, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, "unit": i, "row_groups": groups, **unit_options})
            for i, groups in enumerate(units)
        ])
    merges: list[PrefectFuture | State] = []
    for (date, batch), plan, futures in zip(work, plans, pending, strict=True):
        if not isinstance(futures, list):
            merges.append(futures)
            continue
        states = [_settled(f) for f in futures]
        failure = next((s for s in states if not s.is_completed()), None)
        if failure is not None:
            merges.append(failure)
            continue
        merge_options = {"write_scores": options["write_scores"], "max_bad_row_share": options["max_bad_row_share"]}
        merges.append(runner.submit(merge_units, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, "plan": plan.result(), "unit_results": [s.result() for s in states], **merge_options}))
    states = []
    for (date, batch), futures, merge in zip(work, pending, merges, strict=True):
        states.append(merge if isinstance(merge, State) else _settled(merge))
        if isinstance(futures, list):
            # Only once the merge's final state is here: until then Dask may run it again, from the parts.
            discard_units(root, date, batch)
    return states


def _retry_alone_after_killed_workers(runner: TaskRunner, root: str, work: Work, version: str, options: dict[str, Any], rows_per_unit: int, states: list[State]) -> list[State]:
    """Score once more, each on its own, the files whose tasks Dask gave up on after losing workers.

    Dask blames every task a dying worker held, so a file that merely shared workers with one that
    kills them fails with KilledWorker too. Alone, only a file that kills workers itself fails again.
    """
    suspects = [i for i, state in enumerate(states) if not state.is_completed() and isinstance(_failure(state), KilledWorker)]
    if len(work) == 1 or not suspects:
        return states
    get_run_logger().warning("Dask lost workers while scoring %s; scoring each of them again on its own", [work[i][1].name for i in suspects])
    retried = list(states)
    for i in suspects:
        retried[i] = _score_in_units(runner, root, [work[i]], version, options, rows_per_unit)[0]
    return retried


def _failure(state: State) -> BaseException:
    """Return the exception a Failed, Crashed or Cancelled task ended with."""
    try:
        value = state.result(raise_on_failure=False)
    except BaseException as exc:  # some final states raise rather than return their exception
        value = exc
    if isinstance(value, BaseException):
        return value
    return RuntimeError(f"task ended {state.type.value}: {state.message or 'no message'}")


def _settled(future: PrefectFuture) -> State:
    """Wait for a task's final state, then let go of its Dask result."""
    try:
        return _final_state(future)
    finally:
        if isinstance(future, PrefectDaskFuture):
            # Should the worker holding the result die from now on, Dask must not run the task
            # again: that would rewrite part files this run has already joined and removed.
            future.wrapped_future.release()


def _final_state(future: PrefectFuture) -> State:
    future.wait()
    state = future.state
    if state.is_final():
        return state
    # The task never reported a final state: the Dask worker raised before Prefect could run it
    # (e.g. it could not reach the API). Its exception becomes the failure, so the batch is not lost.
    try:
        future.result()
    except Exception as exc:  # whatever the worker raised is the reason
        return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)
    error = RuntimeError(f"task run {future.task_run_id} did not finish (state {state.type.value})")
    return Failed(message=str(error), data=error)


@contextlib.contextmanager
def _api_shared_with_workers(distributed: bool) -> Iterator[None]:
    """Point Dask workers at this process's Prefect API when no PREFECT_API_URL is configured.

    Without one, Prefect starts a temporary server in each process that needs it, so every Dask
    worker would start its own; the task runs then report to the server this flow run uses.
    """
    if not distributed or PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def _run_name() -> str:
    parameters = flow_run.parameters or {}
    return f"score-{parameters.get('run_date') or 'today'}"


@flow(name="score-batches", flow_run_name=_run_name, timeout_seconds=4 * 3600)
def score_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    run_date: Annotated[dt.date | None, BeforeValidator(empty_means_today), RUN_DATE_SCHEMA, Field(json_schema_extra={"title": "Run date", "default": ""})] = None,
    batch_paths: Annotated[list[str] | None, Field(json_schema_extra={"title": "Batch paths"})] = None,
    force: Annotated[bool, Field(json_schema_extra={"title": "Force re-scoring"})] = False,
    write_scores: Annotated[bool, Field(json_schema_extra={"title": "Write every row's score"})] = True,
    model_version: Annotated[Annotated[str, Field(min_length=1)] | None, Field(json_schema_extra={"title": "Model version"})] = None,
    timezone: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Time zone"})] = DEFAULT_TIMEZONE,
    catch_up_days: Annotated[int, Field(ge=0, le=31, json_schema_extra={"title": "Days of late files to catch up"})] = 3,
    reason_count: Annotated[int, Field(ge=0, le=MAX_REASONS, json_schema_extra={"title": "Reasons per flagged row"})] = 3,
    chunk_rows: Annotated[int, Field(ge=1024, le=10_000_000, json_schema_extra={"title": "Rows per chunk"})] = 131_072,
    max_bad_row_share: Annotated[float, Field(ge=0, le=1, json_schema_extra={"title": "Maximum share of bad rows"})] = 0.1,
    dask_address: Annotated[str | None, Field(json_schema_extra={"title": "Dask scheduler address"})] = None,
    dask_workers: Annotated[int, Field(ge=0, le=1024, json_schema_extra={"title": "Local Dask workers"})] = 0,
    dask_threads_per_worker: Annotated[int, Field(ge=1, le=256, json_schema_extra={"title": "Threads per Dask worker"})] = 1,
    rows_per_unit: Annotated[int, Field(ge=10_000, json_schema_extra={"title": "Rows per Dask work unit"})] = 1_000_000,
) -> dict[str, Any]:
    """Score the Parquet batches of one date with the current model; write flagged rows, scores and reports.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/).
        run_date: Date whose batches (incoming/YYYY-MM-DD/) are scored and under which outputs are partitioned. Empty means today in the time zone below.
        batch_paths: Explicit Parquet files, folders or globs to score instead of incoming/YYYY-MM-DD/.
        force: Score batches again even if the current model already scored them.
        write_scores: Also write every row's score (outputs/scores/) for joining back.
        model_version: Model version to score with. Empty means the current one (models/current.json).
        timezone: IANA time zone that decides what 'today' is, e.g. UTC or Europe/Paris.
        catch_up_days: Also score files of this many earlier dates that have no record yet (late arrivals, files replaced after a rejection), under their own dates; 0 turns it off.
        reason_count: How many features each flagged row names as its reasons (reason_1..k, with share and direction); 0 writes none.
        chunk_rows: Rows read and scored at a time; bounds memory whatever the file size.
        max_bad_row_share: Share of rows with missing or infinite features above which a batch fails instead of being scored.
        dask_address: Address of an existing Dask scheduler (e.g. tcp://10.0.0.5:8786) to score on. Empty means ANOMALY_DASK_ADDRESS, or no Dask.
        dask_workers: Start a local Dask cluster with this many worker processes for the run; 0 scores in this process.
        dask_threads_per_worker: Threads of each local Dask worker (TensorFlow in each worker is limited to them).
        rows_per_unit: On Dask, files are split into units of whole row groups of about this many rows, so no worker holds a whole large file.
    """
    logger = get_run_logger()
    date = resolve_run_date(run_date, timezone)
    scored_at = dt.datetime.now(dt.UTC)
    # Read when the run starts, not when the flow is deployed, so that the worker's environment decides.
    dask_address = dask_address or os.environ.get(DASK_ADDRESS_ENV) or None
    ws = Workspace.at(workspace)
    root = str(ws.root)

    # Step 1: which model, which batches.
    model = resolve_model_version(root, model_version)
    version = model.version
    found = find_batches(root, date, list(batch_paths or []))
    logger.info("Scoring %d batch(es) of %s with model %s (threshold %.6g)", len(found), date, version, model.threshold)

    with contextlib.ExitStack() as locks:
        # Step 2: under the date's lock (a second run of the date waits, then skips what this one scored),
        # and the locks of the earlier dates no other run holds, choose the work.
        locks.enter_context(scoring_lock(ws, date))
        late_dates = [] if batch_paths else _lock_earlier_dates(ws, date, catch_up_days, locks)
        for day in [date, *late_dates]:
            remove_stale_temporaries(root, day)
        work: Work = []
        skipped = []
        for batch in found:
            if not force and already_scored(root, date, batch, version):
                logger.info("%s already scored by model %s; skipped (force=True to redo)", batch.name, version)
                skipped.append(batch.name)
            else:
                work.append((date, batch))
        late = [(day, batch) for day in late_dates for batch in find_late_batches(root, day)]
        if late:
            logger.info("Catching up %d late file(s) of earlier dates: %s", len(late), [f"{d}/{b.name}" for d, b in late])
        work += late
        # Withdrawn before any output is replaced: a run killed from here on leaves these batches to the next run.
        withdraw_records(root, work)

        # Step 3: score; one bad file does not stop the others.
        options = {"write_scores": write_scores, "chunk_rows": chunk_rows, "max_bad_row_share": max_bad_row_share, "scored_at": scored_at, "reason_count": reason_count}
        distributed = bool(dask_address or dask_workers)
        with _api_shared_with_workers(distributed), task_runner(dask_address, dask_workers, dask_threads_per_worker) as runner:
            if distributed:
                states = _score_in_units(runner, root, work, version, options, rows_per_unit)
                states = _retry_alone_after_killed_workers(runner, root, work, version, options, rows_per_unit, states)
            else:
                states = _score_whole_files(runner, root, work, version, options)
        if distributed:
            # The cluster's client is closed, so no unit runs again for this run: sweep what a unit
            # recomputed after a worker died may have rewritten once its batch was merged.
            for day in sorted({d for d, _ in work}):
                remove_stale_temporaries(root, day)

        # Step 4: publish each scored batch (report, then its manifest record, last); withdraw and record each failure.
        scored: list[BatchResult] = []
        failed: list[dict[str, Any]] = []
        for (day, batch), state in zip(work, states, strict=True):
            if not state.is_completed():
                rejection = describe_failure(_failure(state), str(batch.path))
                logger.error("Batch %s of %s failed and is not published: %s", batch.name, day, rejection["error"])
                reject_batch(root, day, batch, rejection)
                failed.append({"date": day.isoformat(), "batch": batch.name, **rejection})
                continue
            result = state.result()
            write_batch_report(root, result, version)
            record_scored_batch(root, result, version)
            scored.append(result)
        caught_up = [{"date": d.isoformat(), "batch": b.name} for d, b in late]

        # Step 5: the run report covers every batch of the date this model published, and this run's failures;
        # an earlier date that got late files has its run report brought up to date too.
        reports = {}
        for day in [date, *sorted({r.run_date for r in scored} - {date})]:
            summary = summarize_date(root, day, version)
            summary["failed_batches"] = [f for f in failed if f["date"] == day.isoformat()]
            with_alarm(summary)
            context = {
                "date": day.isoformat(),
                "model_version": version,
                "batches_scored": sum(r.run_date == day for r in scored),
                "batches_skipped": len(skipped) if day == date else 0,
                "batches_failed": len(summary["failed_batches"]),
            }
            if day == date:
                summary["catch_up_batches"] = caught_up
            reports[day] = summary, write_evaluation_report(summary, str(ws.output_partition("reports", day)), "run-report", f"Scoring run {day}, model {version}", context)
    summary, report_paths = reports[date]

    markdown = storage.read_text(report_paths["markdown"])
    table = [
        {"date": r.run_date.isoformat(), "batch": r.batch, "rows_read": r.rows_read, "rows_scored": r.rows_scored, "rows_flagged": r.rows_flagged, "rows_quarantined": r.rows_quarantined, "flag_rate": round(r.summary["flag_rate"], 6), "error": None}
        for r in scored
    ] + [{"date": f["date"], "batch": f["batch"], "rows_read": 0, "rows_scored": 0, "rows_flagged": 0, "rows_quarantined": 0, "flag_rate": None, "error": f["error"]} for f in failed]
    publish_report_artifacts(f"scoring-report-{date.isoformat()}", markdown, table, f"Scoring run of {date} with model {version}")

    outcome = {
        "date": date.isoformat(),
        "model_version": version,
        "threshold": model.threshold,
        "batches_scored": sum(r.run_date == date for r in scored),
        "batches_skipped": len(skipped),
        "batches_failed": len(failed),
        "rows_read": summary["rows_read"],
        "rows_scored": summary["rows_scored"],
        "rows_flagged": summary["rows_flagged"],
        "rows_quarantined": summary["rows_quarantined"],
        "rows_unlabelled": summary["rows_unlabelled"] if summary["labels"] else None,
        "flag_rate": summary["flag_rate"] if summary["rows_scored"] else None,
        "expected_flag_rate": summary["expected_flag_rate"],
        "flag_rate_band": summary["flag_rate_band"],
        "flag_rate_verdict": summary["flag_rate_verdict"],
        "alarm": summary["alarm"],
        "alarm_reasons": summary["alarm_reasons"],
        **anomaly_class_metrics(summary),
        "catch_up_batches": caught_up,
        "flagged_dir": str(ws.output_partition("flagged", date)),
        "scores_dir": str(ws.output_partition("scores", date)) if write_scores else None,
        "report": report_paths["markdown"],
        "report_json": report_paths["json"],
        "failed": failed,
    }
    emit_night_events(root, outcome)
    if failed:
        names = "; ".join(f["error"] for f in failed)
        raise BatchesFailedError(f"{len(failed)} of {len(work)} batch(es) failed and were not published: {names}", outcome)
    return outcome


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
