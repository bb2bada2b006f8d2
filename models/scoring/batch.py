"""Scoring one batch of a workspace: fingerprint the file, stream it through the model, check it is unchanged, publish.

A batch's outputs and its manifest record always describe the same bytes and the same model:
the record is withdrawn before outputs are replaced and written again only after they are
published, and a batch that fails has neither.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import batches, storage
from data.batches import Batch
from data.errors import BatchFileError, WorkspaceWriteError
from data.outputs import BatchOutputs, StagedOutputs, batch_outputs, batch_report_dir, withdraw_outputs
from data.parquet import open_parquet, read_error
from data.storage import FileState, Fingerprint
from data.workspace import Workspace
from models.bundle import LoadedBundle, current_version, exceedance_beta, load_bundle
from models.evaluation.reports import report_files, write_evaluation_report
from models.monitoring.drift import FeatureBins
from models.monitoring.error_summary import ErrorDistribution, summarize
from models.monitoring.reasons import ReasonTally
from models.scoring.streaming import RowCounts, ScoringOptions, check_bad_row_share, stream_batch_file
from models.threshold import BAND_LEVEL, flag_rate_band, flag_rate_verdict


@dataclass(frozen=True)
class ModelFacts:
    """The facts of a model version that a scoring run reports."""

    version: str
    threshold: float


@dataclass
class BatchResult(RowCounts):
    """What scoring one batch published: counts, output paths, the bytes it came from and its summary."""

    batch: str
    source: str
    run_date: dt.date
    outputs: dict[str, str | None]
    fingerprint: Fingerprint
    summary: dict[str, Any] = field(repr=False, default_factory=dict)

    def counts(self) -> dict[str, Any]:
        """Return the counts and output paths the manifest record keeps."""
        return {**self.row_counts(), "outputs": self.outputs}


def resolve_model(workspace_root: str, model_version: str | None) -> ModelFacts:
    """Return the facts of the requested (or current) model version, after checking it loads."""
    workspace = Workspace.at(workspace_root)
    loaded = load_bundle(workspace.version_dir(model_version or current_version(workspace.models_dir)))
    return ModelFacts(loaded.version, loaded.threshold)


def read_state(path: Path) -> FileState:
    """Return a source file's state before it is scored, turning a failure into an error that names the file."""
    try:
        return storage.file_state(path)
    except OSError as exc:
        raise read_error(path, exc, "file could not be read", "unreadable") from exc


def fingerprint_unchanged(path: Path, before: FileState) -> Fingerprint:
    """Return the fingerprint (with SHA-256) of a file just scored; refuse one whose bytes changed since ``before``."""
    try:
        fingerprint = storage.fingerprint(path)
        after = storage.file_state(path)
    except FileNotFoundError:
        after = None
    except OSError as exc:
        raise read_error(path, exc, "file could not be read", "unreadable") from exc
    if after != before:
        raise BatchFileError(
            path,
            "file changed while it was scored (size, modification or status-change time differ); "
            "nothing was published, the next run scores it again",
            code="changed_during_scoring",
        )
    return fingerprint


def batch_summary(
    distribution: ErrorDistribution,
    reasons: ReasonTally,
    feature_bins: FeatureBins | None,
    bundle: LoadedBundle,
    rows_read: int,
    rows_quarantined: int,
    unseen_categories: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Return a batch's summary from its error distribution, reasons, feature bin counts and row counts.

    The summary includes its flag-rate verdict.
    """
    summary = {
        **summarize(distribution, bundle.percentile),
        "reasons": reasons.to_json(),
        "feature_bins": feature_bins.to_json() if feature_bins is not None else None,
        "rows_read": rows_read,
        "rows_quarantined": rows_quarantined,
        # Values of each categorical feature its training rows never showed, scored in the unseen slot.
        "unseen_categories": unseen_categories or {},
    }
    return with_flag_rate_verdict(summary, bundle.metadata)


def with_flag_rate_verdict(summary: dict[str, Any], bundle_metadata: dict[str, Any]) -> dict[str, Any]:
    """Add the band of flag rates an all-normal batch of the summary's size would show.

    Also add where the observed rate falls, and the threshold's interval.
    """
    band = flag_rate_band(summary["rows_scored"], *exceedance_beta(bundle_metadata))
    uncertainty = bundle_metadata["threshold"].get("uncertainty")
    summary["threshold_interval"] = uncertainty["confidence_interval"] if uncertainty else None
    summary["flag_rate_band"] = list(band)
    summary["flag_rate_band_level"] = BAND_LEVEL
    summary["flag_rate_verdict"] = flag_rate_verdict(summary["rows_flagged"], summary["rows_scored"], band)
    return summary


@dataclass
class FileScore(RowCounts):
    """What scoring one file published, with its summary."""

    outputs: dict[str, str | None]
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


def score_file(
    bundle: LoadedBundle,
    source: Path,
    batch: str,
    targets: BatchOutputs,
    options: ScoringOptions,
    before_publish: Callable[[], None] | None = None,
) -> FileScore:
    """Score a whole file into staged outputs and publish them together once all of it succeeded.

    ``before_publish`` must have passed too.
    """
    with StagedOutputs(targets, options.write_scores) as staged:
        counts = stream_batch_file(bundle, source, batch, staged, options)
        check_bad_row_share(source, counts.rows_read, counts.rows_quarantined, options.max_bad_row_share)
        if before_publish is not None:
            before_publish()
        published = staged.publish()
    summary = batch_summary(
        counts.distribution,
        counts.reasons,
        counts.feature_bins,
        bundle,
        counts.rows_read,
        counts.rows_quarantined,
        counts.unseen_categories,
    )
    return FileScore(
        counts.rows_read, counts.rows_scored, counts.rows_flagged, counts.rows_quarantined, published, summary
    )


def score_batch(
    workspace_root: str,
    run_date: dt.date,
    batch: Batch,
    bundle: LoadedBundle,
    options: ScoringOptions | None = None,
) -> BatchResult:
    """Score one whole file with a loaded model of the workspace and publish its outputs (not its record).

    The SHA-256 the record keeps is taken after scoring, and holds for the bytes scored because the
    file's state is unchanged since before.
    """
    workspace = Workspace.at(workspace_root)
    before = read_state(batch.path)
    scored_bytes: list[Fingerprint] = []

    def unchanged_and_withdrawn() -> None:
        scored_bytes.append(fingerprint_unchanged(batch.path, before))
        batches.withdraw_record(workspace, run_date, batch.name)

    scored = score_file(
        bundle,
        batch.path,
        batch.name,
        batch_outputs(workspace, run_date, batch.name),
        options or ScoringOptions(scored_at=dt.datetime.now(dt.UTC)),
        before_publish=unchanged_and_withdrawn,
    )
    return BatchResult(
        batch=batch.name,
        source=str(batch.path),
        run_date=run_date,
        rows_read=scored.rows_read,
        rows_scored=scored.rows_scored,
        rows_flagged=scored.rows_flagged,
        rows_quarantined=scored.rows_quarantined,
        outputs=scored.outputs,
        fingerprint=scored_bytes[0],
        summary=scored.summary,
    )


def describe_failure(error: BaseException, source: str) -> dict[str, Any]:
    """Return a JSON-able account of why a batch failed: code, column and message."""
    try:
        rows: int | None = open_parquet(storage.as_path(source)).metadata.num_rows
    except Exception:  # unreadable files are exactly the ones that end up here
        rows = None
    return {
        "source": source,
        "rows_in_file": rows,
        "code": getattr(error, "code", type(error).__name__),
        "column": getattr(error, "column", None),
        "error": str(error) or type(error).__name__,
    }


def reject_batch(workspace_root: str, run_date: dt.date, batch: Batch, rejection: dict[str, Any]) -> dict[str, Any]:
    """Withdraw a failed batch's record and outputs and record why it failed.

    Nothing published may disagree with its bytes.
    """
    workspace = Workspace.at(workspace_root)
    batches.withdraw_record(workspace, run_date, batch.name)
    withdrawn = withdraw_outputs(batch_outputs(workspace, run_date, batch.name))
    if rejection.get("code") == WorkspaceWriteError.code:
        # The file is not at fault, so nothing is held against it: the next run, or catch-up, scores it again.
        return {"rejection": None, "withdrawn": withdrawn}
    path = batches.write_rejection(workspace, run_date, batch, rejection)
    return {"rejection": str(path), "withdrawn": withdrawn}


def publish_scored_batches(workspace_root: str, results: list[BatchResult], model_version: str) -> list[dict[str, Any]]:
    """Publish each scored batch: its report (JSON and Markdown), then its manifest record, last.

    A batch whose report or record cannot be written (a full disk) has its outputs withdrawn, so it is
    left unpublished as a whole; return those batches (date, name) with why. The run report draws the night's
    plots once, so a night of many small files pays for no plot per file.
    """
    workspace = Workspace.at(workspace_root)
    unpublished = []
    for result in results:
        context = {
            "batch": result.batch,
            "source": result.source,
            "model_version": model_version,
            "date": result.run_date.isoformat(),
        }
        folder = batch_report_dir(workspace, result.run_date)
        title = f"Batch {result.batch} ({result.run_date})"
        batch = Batch(result.batch, storage.as_path(result.source))
        try:
            write_evaluation_report(result.summary, folder, result.batch, title, context, plots=False)
            batches.write_record(workspace, result.run_date, batch, model_version, result.fingerprint, result.counts())
        except OSError as exc:
            withdraw_outputs(batch_outputs(workspace, result.run_date, result.batch))
            for path in report_files(folder, result.batch).values():
                storage.remove(path)
            unpublished.append(
                {"date": result.run_date.isoformat(), "batch": result.batch, **describe_failure(exc, result.source)}
            )
    return unpublished
