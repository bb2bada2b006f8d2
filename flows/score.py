"""Nightly scoring flow: score the batches of a date with the current model and report on them."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from pydantic import Field

from data.errors import AnomalyJobError
from data.locks import scoring_lock
from data.workspace import Workspace, default_workspace, resolve_run_date
from models.reports import anomaly_class_metrics
from models.scoring import batch_report_dir, describe_failure
from tasks.reporting import publish_report_artifacts, write_evaluation_report
from tasks.scoring import (
    already_scored,
    discard_units,
    find_batches,
    merge_units,
    plan_units,
    record_rejected_batch,
    record_scored_batch,
    remove_stale_temporaries,
    resolve_model_version,
    score_batch,
    score_unit,
    summarize_run,
)

DEFAULT_TIMEZONE = os.environ.get("ANOMALY_TIMEZONE", "UTC")
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


def _score_whole_files(runner: TaskRunner, root: str, date: dt.date, todo: list[dict[str, str]], version: str, write_scores: bool, chunk_rows: int, max_bad_row_share: float, scored_at: dt.datetime) -> list[State]:
    futures = [runner.submit(score_batch, parameters={"workspace_root": root, "run_date": date, "batch": b, "model_version": version, "write_scores": write_scores, "chunk_rows": chunk_rows, "max_bad_row_share": max_bad_row_share, "scored_at": scored_at}) for b in todo]
    return [_settled(f) for f in futures]


def _score_in_units(runner: TaskRunner, root: str, date: dt.date, todo: list[dict[str, str]], version: str, write_scores: bool, chunk_rows: int, max_bad_row_share: float, rows_per_unit: int, scored_at: dt.datetime) -> list[State]:
    logger = get_run_logger()
    unit_futures: list[list[PrefectFuture] | PrefectFuture | State] = []
    for batch in todo:
        plan = plan_units(batch, rows_per_unit, return_state=True)
        if plan.is_failed():
            unit_futures.append(plan)
            continue
        units = plan.result()
        logger.info("Batch %s: %d unit(s) of row groups", batch["name"], len(units))
        if len(units) == 1:
            # A file small enough for one unit is scored straight into its outputs, with nothing to join.
            unit_futures.append(runner.submit(score_batch, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, "write_scores": write_scores, "chunk_rows": chunk_rows, "max_bad_row_share": max_bad_row_share, "scored_at": scored_at}))
            continue
        unit_futures.append([
            runner.submit(score_unit, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, "unit": i, "row_groups": groups, "chunk_rows": chunk_rows, "scored_at": scored_at})
            for i, groups in enumerate(units)
        ])
    merges: list[PrefectFuture | State] = []
    for batch, futures in zip(todo, unit_futures, strict=True):
        if not isinstance(futures, list):
            merges.append(futures)
            continue
        states = [_settled(f) for f in futures]
        failure = next((s for s in states if s.is_failed()), None)
        if failure is not None:
            discard_units(root, date, batch)
            merges.append(failure)
            continue
        merges.append(runner.submit(merge_units, parameters={"workspace_root": root, "run_date": date, "batch": batch, "model_version": version, "unit_results": [s.result() for s in states], "write_scores": write_scores, "max_bad_row_share": max_bad_row_share}))
    return [m if isinstance(m, State) else _settled(m) for m in merges]


def _settled(future: PrefectFuture) -> State:
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
    run_date: Annotated[dt.date | None, Field(json_schema_extra={"title": "Run date"})] = None,
    batch_paths: Annotated[list[str] | None, Field(json_schema_extra={"title": "Batch paths"})] = None,
    force: Annotated[bool, Field(json_schema_extra={"title": "Force re-scoring"})] = False,
    write_scores: Annotated[bool, Field(json_schema_extra={"title": "Write every row's score"})] = True,
    model_version: Annotated[Annotated[str, Field(min_length=1)] | None, Field(json_schema_extra={"title": "Model version"})] = None,
    timezone: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Time zone"})] = DEFAULT_TIMEZONE,
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
    distributed = bool(dask_address or dask_workers)
    with scoring_lock(ws, date):
        remove_stale_temporaries(root, date)
        todo = []
        for batch in found:
            if not force and already_scored(root, date, batch, version):
                logger.info("%s already scored by model %s; skipped (force=True to redo)", batch["name"], version)
                skipped.append(batch["name"])
            else:
                todo.append(batch)
        with _api_shared_with_workers(distributed), task_runner(dask_address, dask_workers, dask_threads_per_worker) as runner:
            if distributed:
                states = _score_in_units(runner, root, date, todo, version, write_scores, chunk_rows, max_bad_row_share, rows_per_unit, scored_at)
            else:
                states = _score_whole_files(runner, root, date, todo, version, write_scores, chunk_rows, max_bad_row_share, scored_at)
        for batch, state in zip(todo, states, strict=True):
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
