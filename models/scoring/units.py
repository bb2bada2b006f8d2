"""One file split across workers: planning units of row groups, scoring each to private parts, merging them in order."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import batches, storage
from data.batches import Batch
from data.outputs import BatchOutputs, StagedOutputs, batch_outputs
from data.parquet import concatenate_parquet, plan_row_group_units
from data.storage import FileState
from data.workspace import Workspace, check_path_part
from models.bundle import load_bundle
from models.monitoring.drift import FeatureBins
from models.monitoring.error_summary import ErrorDistribution
from models.monitoring.reasons import ReasonTally
from models.scoring.batch import BatchResult, batch_summary, fingerprint_unchanged, read_state
from models.scoring.streaming import RowCounts, ScoringOptions, check_bad_row_share, stream_batch_file


@dataclass(frozen=True)
class UnitPlan:
    """The row-group units a file is scored in, and the file's state when they were planned."""

    units: list[list[int]]
    before: FileState


@dataclass
class UnitResult(RowCounts):
    """What scoring one unit wrote into its private part files."""

    unit: int
    parts: dict[str, str | None]
    distribution: dict[str, Any] = field(repr=False, default_factory=dict)
    reasons: dict[str, Any] = field(repr=False, default_factory=dict)
    feature_bins: list[list[int]] | None = field(repr=False, default=None)
    unseen_categories: dict[str, int] = field(repr=False, default_factory=dict)


def plan_units(batch: Batch, rows_per_unit: int) -> UnitPlan:
    """Note a file's state, then split it into units of whole row groups of about ``rows_per_unit`` rows."""
    before = read_state(batch.path)
    return UnitPlan(plan_row_group_units(batch.path, rows_per_unit), before)


def parts_dir(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return the private folder holding the per-unit outputs of one file split across workers."""
    return workspace.state_dir / "parts" / f"date={run_date.isoformat()}" / check_path_part(batch, "batch")


def score_unit(
    workspace_root: str,
    run_date: dt.date,
    batch: Batch,
    model_version: str,
    unit: int,
    row_groups: Sequence[int],
    options: ScoringOptions,
) -> UnitResult:
    """Score some row groups of a file into private part files; the worker loads the model once per process."""
    workspace = Workspace.at(workspace_root)
    bundle = load_bundle(workspace.version_dir(model_version))
    folder = parts_dir(workspace, run_date, batch.name) / f"unit-{unit:05d}"
    targets = BatchOutputs(
        flagged=folder / "flagged.parquet", scores=folder / "scores.parquet", quarantine=folder / "quarantine.parquet"
    )
    with StagedOutputs(targets) as staged:
        counts = stream_batch_file(bundle, batch.path, batch.name, staged, options, row_groups=row_groups)
        parts = staged.publish()
    feature_bins = counts.feature_bins.to_json() if counts.feature_bins is not None else None
    return UnitResult(
        rows_read=counts.rows_read,
        rows_scored=counts.rows_scored,
        rows_flagged=counts.rows_flagged,
        rows_quarantined=counts.rows_quarantined,
        unit=unit,
        parts=parts,
        distribution=counts.distribution.to_json(),
        reasons=counts.reasons.to_json(),
        feature_bins=feature_bins,
        unseen_categories=counts.unseen_categories,
    )


def merge_units(
    workspace_root: str,
    run_date: dt.date,
    batch: Batch,
    model_version: str,
    plan: UnitPlan,
    unit_results: Sequence[UnitResult],
    options: ScoringOptions,
) -> BatchResult:
    """Join a file's units, in row-group order, into its published outputs; the parts are left for the caller to remove.

    Dask runs a finished merge again when the worker holding its result dies before the flow has it,
    so the merge must find its inputs a second time.
    """
    workspace = Workspace.at(workspace_root)
    bundle = load_bundle(workspace.version_dir(model_version))
    units = sorted(unit_results, key=lambda r: r.unit)
    rows_read = sum(r.rows_read for r in units)
    rows_quarantined = sum(r.rows_quarantined for r in units)
    check_bad_row_share(batch.path, rows_read, rows_quarantined, options.max_bad_row_share)
    distribution = ErrorDistribution(bundle.threshold)
    reasons = ReasonTally(bundle.feature_names)
    feature_bins = FeatureBins.for_reference(bundle.drift_reference) if bundle.drift_reference else None
    for result in units:
        distribution.merge(ErrorDistribution.from_json(result.distribution))
        reasons.merge(ReasonTally.from_json(result.reasons))
        if feature_bins is not None:
            feature_bins.merge(FeatureBins.from_counts(bundle.drift_reference, result.feature_bins))
    with StagedOutputs(batch_outputs(workspace, run_date, batch.name), options.write_scores) as staged:
        concatenate_parquet([storage.as_path(r.parts["flagged"]) for r in units], staged.flagged.tmp)
        if staged.scores is not None:
            concatenate_parquet([storage.as_path(r.parts["scores"]) for r in units], staged.scores.tmp)
        quarantine_parts = [storage.as_path(r.parts["quarantine"]) for r in units if r.parts["quarantine"]]
        if quarantine_parts:
            concatenate_parquet(quarantine_parts, staged.stage_quarantine())
        fingerprint = fingerprint_unchanged(batch.path, plan.before)
        batches.withdraw_record(workspace, run_date, batch.name)
        published = staged.publish()
    return BatchResult(
        batch=batch.name,
        source=str(batch.path),
        run_date=run_date,
        rows_read=rows_read,
        rows_scored=sum(r.rows_scored for r in units),
        rows_flagged=sum(r.rows_flagged for r in units),
        rows_quarantined=rows_quarantined,
        outputs=published,
        fingerprint=fingerprint,
        summary=batch_summary(
            distribution,
            reasons,
            feature_bins,
            bundle,
            rows_read,
            rows_quarantined,
            dict(sum((Counter(r.unseen_categories) for r in units), Counter())),
        ),
    )


def discard_date_parts(workspace_root: str, run_date: dt.date) -> list[Path]:
    """Remove every unit part file of a date; only safe under the date's scoring lock, before or after its units run.

    Dask recomputes a finished unit whose result was held by a worker that died, and that second run
    can rewrite its parts after they were removed: such orphans go here.
    """
    folder = Workspace.at(workspace_root).state_dir / "parts" / f"date={run_date.isoformat()}"
    found = storage.list_files(folder, "*", recursive=True)
    storage.remove_tree(folder)
    return found


def discard_units(workspace_root: str, run_date: dt.date, batch: str) -> None:
    """Remove the part files of one file's units, once its merge or its failure is final."""
    storage.remove_tree(parts_dir(Workspace.at(workspace_root), run_date, batch))
