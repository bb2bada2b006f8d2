"""Tasks of the nightly scoring flow."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import batches, storage
from data.batches import Batch
from data.output_schema import OUTPUT_KINDS
from data.outputs import batch_report_dir
from data.workspace import Workspace
from models.scoring import batch as batch_scoring
from models.scoring import groups, run_summary, units
from models.scoring.batch import BatchResult, ModelFacts
from models.scoring.groups import WorkGroup
from models.scoring.streaming import ScoringOptions
from models.scoring.units import UnitPlan, UnitResult
from tasks.common import RETRIES


@task(name="resolve-model-version", cache_policy=NO_CACHE)
def resolve_model_version(workspace_root: str, model_version: str | None) -> ModelFacts:
    """Return the facts of the requested (or current) model version, after checking it loads."""
    return batch_scoring.resolve_model(workspace_root, model_version)


@task(name="find-batches", cache_policy=NO_CACHE, **RETRIES)
def find_batches(workspace_root: str, run_date: dt.date, batch_paths: list[str]) -> list[Batch]:
    """List the batches of the date (or the explicit paths)."""
    found = batches.find_batches(Workspace.at(workspace_root), run_date, batch_paths)
    get_run_logger().info("Found %d batch file(s) to consider", len(found))
    return found


@task(name="find-late-batches", cache_policy=NO_CACHE, **RETRIES)
def find_late_batches(workspace_root: str, run_date: dt.date) -> list[Batch]:
    """List the files of an earlier date that have no record: late arrivals, and files replaced after a rejection."""
    workspace = Workspace.at(workspace_root)
    return [b for b in batches.incoming_batches(workspace, run_date) if batches.awaits_scoring(workspace, run_date, b)]


@task(name="count-unscored-batches", cache_policy=NO_CACHE, **RETRIES)
def count_unscored_batches(workspace_root: str, run_date: dt.date, model_version: str) -> tuple[int, int]:
    """Return how many batches a date holds, and how many of them the model has not scored as they are now."""
    return batches.unscored_batches(Workspace.at(workspace_root), run_date, model_version)


@task(name="find-already-scored", cache_policy=NO_CACHE, **RETRIES)
def find_already_scored(workspace_root: str, run_date: dt.date, found: list[Batch], model_version: str) -> list[Batch]:
    """Return the batches the model already scored and that have not changed since."""
    return batches.scored_already(Workspace.at(workspace_root), run_date, found, model_version)


@task(name="withdraw-records", cache_policy=NO_CACHE, **RETRIES)
def withdraw_records(workspace_root: str, work: list[tuple[dt.date, Batch]]) -> int:
    """Withdraw the manifest records of the batches about to be scored, before any of their outputs is replaced."""
    workspace = Workspace.at(workspace_root)
    return sum(batches.withdraw_record(workspace, date, batch.name) for date, batch in work)


@task(name="plan-groups", cache_policy=NO_CACHE, **RETRIES)
def plan_groups(work: list[tuple[dt.date, Batch]], rows_per_unit: int) -> list[WorkGroup]:
    """Group the run's files into work units of about ``rows_per_unit`` rows, so small files share a task."""
    planned = groups.group_work(work, rows_per_unit)
    get_run_logger().info("%d file(s) in %d work unit(s) of at most %d rows", len(work), len(planned), rows_per_unit)
    return planned


@task(name="score-group", cache_policy=NO_CACHE, **RETRIES)
def score_group(
    workspace_root: str, items: list[tuple[dt.date, Batch]], model_version: str, options: ScoringOptions
) -> list[BatchResult | dict[str, Any]]:
    """Score a work unit's files one by one; publish each one's flagged rows (with reasons), scores and quarantine."""
    outcomes = groups.score_group(workspace_root, items, model_version, options)
    scored = [o for o in outcomes if isinstance(o, BatchResult)]
    get_run_logger().info(
        "%d file(s): %d scored (%d rows, %d flagged, %d quarantined), %d failed",
        len(items),
        len(scored),
        sum(r.rows_scored for r in scored),
        sum(r.rows_flagged for r in scored),
        sum(r.rows_quarantined for r in scored),
        len(outcomes) - len(scored),
    )
    return outcomes


@task(name="publish-scored-batches", cache_policy=NO_CACHE, **RETRIES)
def publish_scored_batches(workspace_root: str, results: list[BatchResult], model_version: str) -> list[dict[str, Any]]:
    """Publish the scored batches (each one's report, then its manifest record); return those that could not be."""
    unpublished = batch_scoring.publish_scored_batches(workspace_root, results, model_version)
    logger = get_run_logger()
    for failure in unpublished:
        logger.error("Batch %s of %s is not published: %s", failure["batch"], failure["date"], failure["error"])
    return unpublished


@task(name="reject-batch", cache_policy=NO_CACHE, **RETRIES)
def reject_batch(workspace_root: str, run_date: dt.date, batch: Batch, rejection: dict[str, Any]) -> dict[str, Any]:
    """Withdraw a failed batch's record and outputs and record why it failed."""
    outcome = batch_scoring.reject_batch(workspace_root, run_date, batch, rejection)
    if outcome["withdrawn"]:
        get_run_logger().warning(
            "Batch %s: withdrew %d earlier output file(s), which no longer match the file",
            batch.name,
            len(outcome["withdrawn"]),
        )
    return outcome


@task(name="summarize-date", cache_policy=NO_CACHE)
def summarize_date(workspace_root: str, run_date: dt.date, model_version: str) -> dict[str, Any]:
    """Add up the reports of every batch of the date this model published."""
    return run_summary.summarize_date(workspace_root, run_date, model_version)


@task(name="remove-stale-temporaries", cache_policy=NO_CACHE)
def remove_stale_temporaries(workspace_root: str, run_date: dt.date) -> list[str]:
    """Delete temporary files a killed run left in the date's output partitions, and any unit parts of the date."""
    workspace = Workspace.at(workspace_root)
    folders = [workspace.output_partition(kind, run_date) for kind in (*OUTPUT_KINDS, "rejected", "reports")]
    folders += [batch_report_dir(workspace, run_date), batches.records_dir(workspace, run_date)]
    removed = [p for folder in folders for p in storage.remove_stale_temporaries(folder)]
    removed += units.discard_date_parts(workspace_root, run_date)
    if removed:
        get_run_logger().warning(
            "Removed %d temporary file(s) left by a run that died: %s", len(removed), [p.name for p in removed]
        )
    return [str(p) for p in removed]


@task(name="plan-units", cache_policy=NO_CACHE, **RETRIES)
def plan_units(batch: Batch, rows_per_unit: int) -> UnitPlan:
    """Note a file's state and split it into row-group units, so that no worker holds a whole large file."""
    return units.plan_units(batch, rows_per_unit)


@task(name="score-unit", cache_policy=NO_CACHE, **RETRIES)
def score_unit(
    workspace_root: str,
    run_date: dt.date,
    batch: Batch,
    model_version: str,
    unit: int,
    row_groups: list[int],
    options: ScoringOptions,
) -> UnitResult:
    """Score some row groups of one file into part files."""
    result = units.score_unit(
        workspace_root, run_date, batch, model_version, unit=unit, row_groups=row_groups, options=options
    )
    get_run_logger().info(
        "Batch %s, unit %d (row groups %d-%d): %d rows scored",
        batch.name,
        unit,
        row_groups[0],
        row_groups[-1],
        result.rows_scored,
    )
    return result


@task(name="merge-units", cache_policy=NO_CACHE, **RETRIES)
def merge_units(
    workspace_root: str,
    run_date: dt.date,
    batch: Batch,
    model_version: str,
    plan: UnitPlan,
    unit_results: list[UnitResult],
    options: ScoringOptions,
) -> BatchResult:
    """Join a file's units into its flagged rows, scores and quarantine."""
    result = units.merge_units(
        workspace_root, run_date, batch, model_version, plan=plan, unit_results=unit_results, options=options
    )
    get_run_logger().info(
        "Batch %s: %d units joined, %d rows scored, %d flagged",
        batch.name,
        len(unit_results),
        result.rows_scored,
        result.rows_flagged,
    )
    return result


@task(name="discard-units", cache_policy=NO_CACHE)
def discard_units(workspace_root: str, run_date: dt.date, batch: Batch) -> None:
    """Remove the part files of a file's units once its merge or its failure is final."""
    units.discard_units(workspace_root, run_date, batch.name)

