"""Tasks of the nightly scoring flow."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import atomic, batches
from data.workspace import Workspace
from models import bundle, scoring
from tasks.common import retry_on_os_error


@task(name="resolve-model-version", cache_policy=NO_CACHE)
def resolve_model_version(workspace_root: str, model_version: str | None) -> dict[str, Any]:
    """Return the bundle facts of the requested (or current) model version, after checking it loads."""
    workspace = Workspace.at(workspace_root)
    version = model_version or bundle.current_version(workspace.models_dir)
    loaded = bundle.load_bundle(workspace.version_dir(version))
    return {"model_version": loaded.version, "threshold": loaded.threshold, "percentile": loaded.percentile, "features": loaded.feature_names}


@task(name="find-batches", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def find_batches(workspace_root: str, run_date: dt.date, batch_paths: list[str]) -> list[dict[str, str]]:
    """List the batches of the date (or the explicit paths)."""
    found = batches.find_batches(Workspace.at(workspace_root), run_date, batch_paths)
    get_run_logger().info("Found %d batch file(s) to consider", len(found))
    return [{"name": b.name, "path": str(b.path)} for b in found]


@task(name="check-already-scored", cache_policy=NO_CACHE)
def already_scored(workspace_root: str, run_date: dt.date, batch: dict[str, str], model_version: str) -> bool:
    """Return True if the batch was scored by this model and has not changed since."""
    return batches.already_scored(Workspace.at(workspace_root), run_date, batches.Batch(batch["name"], Path(batch["path"])), model_version)


@task(name="score-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def score_batch(workspace_root: str, run_date: dt.date, batch: dict[str, str], model_version: str, write_scores: bool, chunk_rows: int, max_bad_row_share: float, scored_at: dt.datetime) -> dict[str, Any]:
    """Score one batch file; write its flagged rows, scores and quarantined rows."""
    result = scoring.score_batch(workspace_root, run_date, batch["name"], batch["path"], model_version, write_scores, chunk_rows, max_bad_row_share, scored_at)
    get_run_logger().info(
        "Batch %s: %d rows scored, %d flagged (%.2f%%), %d quarantined",
        batch["name"], result["rows_scored"], result["rows_flagged"], 100 * result["summary"]["flag_rate"], result["rows_quarantined"],
    )
    return result


@task(name="record-scored-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def record_scored_batch(workspace_root: str, run_date: dt.date, batch: dict[str, str], model_version: str, result: dict[str, Any]) -> str:
    """Add the batch to the manifest of what was scored; only after its outputs are in place."""
    return str(batches.write_record(Workspace.at(workspace_root), run_date, batches.Batch(batch["name"], Path(batch["path"])), model_version, result))


@task(name="summarize-run", cache_policy=NO_CACHE)
def summarize_run(workspace_root: str, run_date: dt.date, batch_names: list[str], model_version: str) -> dict[str, Any]:
    """Combine the batch reports of the date into the run's summary."""
    return scoring.summarize_run(workspace_root, run_date, batch_names, model_version)


@task(name="remove-stale-temporaries", cache_policy=NO_CACHE)
def remove_stale_temporaries(workspace_root: str, run_date: dt.date) -> list[str]:
    """Delete temporary files a killed run left in the date's output partitions."""
    workspace = Workspace.at(workspace_root)
    removed = [p for kind in scoring.OUTPUT_KINDS for p in atomic.remove_stale_temporaries(workspace.output_partition(kind, run_date))]
    if removed:
        get_run_logger().warning("Removed %d temporary file(s) left by a run that died: %s", len(removed), [p.name for p in removed])
    return [str(p) for p in removed]


@task(name="record-rejected-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def record_rejected_batch(workspace_root: str, run_date: dt.date, batch: dict[str, str], rejection: dict[str, Any]) -> str:
    """Record why a whole file was rejected, beside the date's quarantined rows."""
    return str(scoring.record_rejected_file(Workspace.at(workspace_root), run_date, batch["name"], rejection))


@task(name="plan-units", cache_policy=NO_CACHE)
def plan_units(batch: dict[str, str], rows_per_unit: int) -> list[list[int]]:
    """Split a file into row-group units so that no worker holds a whole large file."""
    return scoring.plan_units(batch["path"], rows_per_unit)


@task(name="score-unit", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def score_unit(workspace_root: str, run_date: dt.date, batch: dict[str, str], model_version: str, unit: int, row_groups: list[int], chunk_rows: int, scored_at: dt.datetime) -> dict[str, Any]:
    """Score some row groups of one file into part files."""
    result = scoring.score_unit(workspace_root, run_date, batch["name"], batch["path"], model_version, unit, row_groups, chunk_rows, scored_at)
    get_run_logger().info("Batch %s, unit %d (row groups %d-%d): %d rows scored", batch["name"], unit, row_groups[0], row_groups[-1], result["rows_scored"])
    return result


@task(name="merge-units", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_os_error)
def merge_units(workspace_root: str, run_date: dt.date, batch: dict[str, str], model_version: str, unit_results: list[dict[str, Any]], write_scores: bool, max_bad_row_share: float) -> dict[str, Any]:
    """Join a file's units into its flagged rows, scores and quarantine."""
    result = scoring.merge_units(workspace_root, run_date, batch["name"], batch["path"], model_version, unit_results, write_scores, max_bad_row_share)
    get_run_logger().info("Batch %s: %d units joined, %d rows scored, %d flagged", batch["name"], len(unit_results), result["rows_scored"], result["rows_flagged"])
    return result


@task(name="discard-units", cache_policy=NO_CACHE)
def discard_units(workspace_root: str, run_date: dt.date, batch: dict[str, str]) -> None:
    """Remove the part files of a file whose units failed."""
    scoring.discard_units(workspace_root, run_date, batch["name"])
