"""How a scoring run's batches reach the task runner: in this process one at a time, or fanned out on Dask.

On Dask they go out in units of row groups, with the retries Dask's lost workers call for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from distributed import KilledWorker
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import MissingResult
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from data.batches import Batch
from models.scoring.batch import BatchResult, describe_failure
from models.scoring.groups import Work, WorkGroup
from models.scoring.streaming import ScoringOptions
from tasks.scoring import (
    discard_units,
    merge_units,
    plan_groups,
    plan_units,
    remove_stale_temporaries,
    score_group,
    score_unit,
)

DASK_ADDRESS_ENV = "ANOMALY_DASK_ADDRESS"


def task_runner(dask_address: str | None, dask_workers: int, threads_per_worker: int) -> TaskRunner:
    """Return a run's task runner: an existing Dask cluster, a local one, or one task at a time in this process."""
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


Outcome = BatchResult | dict[str, Any] | State
"""How a file ended in the task runner: its result, why it failed, or the final state of the task that failed."""


GroupFutures = list[tuple[WorkGroup, PrefectFuture]]


def submit_groups(
    runner: TaskRunner, root: str, work: Work, planned: list[WorkGroup], version: str, options: ScoringOptions
) -> GroupFutures:
    """Submit each group of files as one task, without waiting for any."""
    return [
        (
            group,
            runner.submit(
                score_group,
                parameters={
                    "workspace_root": root,
                    "items": [work[i] for i in group.positions],
                    "model_version": version,
                    "options": options,
                },
            ),
        )
        for group in planned
    ]


def settle_groups(futures: GroupFutures) -> dict[int, Outcome]:
    """Wait for each group's task; return each file's outcome by its position in the run's work."""
    outcomes: dict[int, Outcome] = {}
    for group, future in futures:
        state = _settled(future)
        ends = state.result() if state.is_completed() else [state] * len(group.positions)
        outcomes.update(zip(group.positions, ends, strict=True))
    return outcomes


def score_in_units(
    runner: TaskRunner, root: str, work: Work, version: str, options: ScoringOptions, rows_per_unit: int
) -> list[Outcome]:
    """Score each batch as units of row groups on Dask, then merge each batch's units in order."""
    logger = get_run_logger()
    # Planning reads only file metadata: it runs here, and the workers hash the files as they finish them.
    plans = [plan_units(batch, rows_per_unit, return_state=True) for _, batch in work]
    pending: list[list[PrefectFuture] | PrefectFuture | State] = []
    for (date, batch), plan in zip(work, plans, strict=True):
        if not plan.is_completed():
            pending.append(plan)
            continue
        units = plan.result().units
        logger.info("Batch %s: %d unit(s) of row groups", batch.name, len(units))
        if len(units) == 1:
            # A file small enough for one unit is scored straight into its outputs, with nothing to join.
            pending.append(
                runner.submit(
                    score_group,
                    parameters={
                        "workspace_root": root,
                        "items": [(date, batch)],
                        "model_version": version,
                        "options": options,
                    },
                )
            )
            continue
        pending.append(
            [
                runner.submit(
                    score_unit,
                    parameters={
                        "workspace_root": root,
                        "run_date": date,
                        "batch": batch,
                        "model_version": version,
                        "unit": i,
                        "row_groups": groups,
                        "options": options,
                    },
                )
                for i, groups in enumerate(units)
            ]
        )
    merges: list[PrefectFuture | State] = []
    for (date, batch), plan, futures in zip(work, plans, pending, strict=True):
        if not isinstance(futures, list):
            merges.append(futures)
            continue
        states = [_settled(f) for f in futures]
        failed_unit = next((s for s in states if not s.is_completed()), None)
        if failed_unit is not None:
            merges.append(failed_unit)
            continue
        merges.append(
            runner.submit(
                merge_units,
                parameters={
                    "workspace_root": root,
                    "run_date": date,
                    "batch": batch,
                    "model_version": version,
                    "plan": plan.result(),
                    "unit_results": [s.result() for s in states],
                    "options": options,
                },
            )
        )
    outcomes: list[Outcome] = []
    for (date, batch), futures, merge in zip(work, pending, merges, strict=True):
        state = merge if isinstance(merge, State) else _settled(merge)
        if isinstance(futures, list):
            # Only once the merge's final state is here: until then Dask may run it again, from the parts.
            discard_units(root, date, batch)
        if not state.is_completed():
            outcomes.append(state)
        elif isinstance(futures, list):
            outcomes.append(state.result())
        else:
            outcomes.append(state.result()[0])  # a file of one unit, scored as a group of one
    return outcomes


def retry_alone_after_killed_workers(
    runner: TaskRunner,
    root: str,
    work: Work,
    version: str,
    options: ScoringOptions,
    rows_per_unit: int,
    outcomes: list[Outcome],
) -> list[Outcome]:
    """Score once more, each on its own, the files whose tasks Dask gave up on after losing workers.

    Dask blames every task a dying worker held, so a file that merely shared workers (or a group) with
    one that kills them fails with KilledWorker too, or loses a finished task's result with it. Alone,
    only a file that kills workers itself fails again.
    """
    suspects = [
        i
        for i, outcome in enumerate(outcomes)
        if isinstance(outcome, State)
        and not outcome.is_completed()
        and isinstance(failure(outcome), KilledWorker | LostResultError)
    ]
    if len(work) == 1 or not suspects:
        return outcomes
    get_run_logger().warning(
        "Dask lost workers while scoring %s; scoring each of them again on its own", [work[i][1].name for i in suspects]
    )
    retried = list(outcomes)
    for i in suspects:
        retried[i] = score_in_units(runner, root, [work[i]], version, options, rows_per_unit)[0]
    return retried


def failure(state: State) -> BaseException:
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


class LostResultError(RuntimeError):
    """A task completed, but the Dask worker holding its result died before the flow had it."""


def _final_state(future: PrefectFuture) -> State:
    future.wait()
    state = future.state
    if state.is_completed():
        try:
            state.result()
        except MissingResult:
            # The state came from the API, without its data: scored again, as after a lost worker.
            error = LostResultError(f"task run {future.task_run_id} completed, but its worker died with its result")
            return Failed(message=str(error), data=error)
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
def api_shared_with_workers(distributed: bool) -> Iterator[None]:
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


def score_work(
    root: str,
    work: Work,
    version: str,
    options: ScoringOptions,
    dask_address: str | None,
    dask_workers: int,
    threads_per_worker: int,
    rows_per_unit: int,
) -> list[BatchResult | dict[str, Any]]:
    """Score every (date, batch) of ``work``; return, in order, each one's result or why it failed.

    Small files are scored in groups of about ``rows_per_unit`` rows, one task each; on Dask a larger
    file is split into units of row groups. A failed batch does not stop the others.
    """
    # Read when the run starts, not when the flow is deployed, so that the worker's environment decides.
    dask_address = dask_address or os.environ.get(DASK_ADDRESS_ENV) or None
    distributed = bool(dask_address or dask_workers)
    with api_shared_with_workers(distributed), task_runner(dask_address, dask_workers, threads_per_worker) as runner:
        planned = plan_groups(work=work, rows_per_unit=rows_per_unit)
        large = [g.positions[0] for g in planned if distributed and g.is_large_file(rows_per_unit)]
        small = [g for g in planned if not (distributed and g.is_large_file(rows_per_unit))]
        # Submitted first and waited for last, so that on Dask the groups run while large files are split and merged.
        groups = submit_groups(runner, root, work, small, version, options)
        large_outcomes = score_in_units(runner, root, [work[i] for i in large], version, options, rows_per_unit)
        outcomes = settle_groups(groups)
        outcomes.update(zip(large, large_outcomes, strict=True))
        ordered = [outcomes[i] for i in range(len(work))]
        if distributed:
            ordered = retry_alone_after_killed_workers(runner, root, work, version, options, rows_per_unit, ordered)
    if distributed:
        # The cluster's client is closed, so no unit runs again for this run: sweep what a unit
        # recomputed after a worker died may have rewritten once its batch was merged.
        for day in sorted({d for d, _ in work}):
            remove_stale_temporaries(root, day)
    return [_ended(outcome, batch) for outcome, (_, batch) in zip(ordered, work, strict=True)]


def _ended(outcome: Outcome, batch: Batch) -> BatchResult | dict[str, Any]:
    """Return a file's result, or why it failed; a failed task's exception becomes the failure's description."""
    return describe_failure(failure(outcome), str(batch.path)) if isinstance(outcome, State) else outcome
