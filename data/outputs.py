"""Where a batch's outputs go, and publishing them: staged under temporary names, renamed into place together."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from data import storage
from data.storage import StagedFile
from data.workspace import Workspace, check_path_part


@dataclass(frozen=True)
class BatchOutputs:
    """The published paths of one batch's outputs."""

    flagged: Path
    scores: Path
    quarantine: Path

    def paths(self) -> tuple[Path, Path, Path]:
        """Every output path, written or not."""
        return (self.flagged, self.scores, self.quarantine)


def batch_outputs(workspace: Workspace, run_date: dt.date, batch: str) -> BatchOutputs:
    """Return the output paths of one batch under the date's Hive partitions."""
    file_name = f"{check_path_part(batch, 'batch')}.parquet"
    return BatchOutputs(
        flagged=workspace.output_partition("flagged", run_date) / file_name,
        scores=workspace.output_partition("scores", run_date) / file_name,
        quarantine=workspace.output_partition("quarantine", run_date) / file_name,
    )


def batch_report_dir(workspace: Workspace, run_date: dt.date) -> Path:
    """Return the folder of per-batch reports for a date."""
    return workspace.output_partition("reports", run_date) / "batches"


def withdraw_outputs(outputs: BatchOutputs) -> list[str]:
    """Remove a batch's published outputs; return the paths that were there."""
    return [str(path) for path in outputs.paths() if storage.remove(path)]


class StagedOutputs:
    """One batch's outputs being written under temporary names; nothing is visible until :meth:`publish`.

    Scores are staged only when asked for; quarantine only once a bad row turns up. Publishing
    removes an earlier run's scores or quarantine file that this run does not replace, so what is
    published always comes from one run.
    """

    def __init__(self, targets: BatchOutputs, write_scores: bool = True):
        self.targets = targets
        self.flagged = StagedFile(targets.flagged)
        self.scores = StagedFile(targets.scores) if write_scores else None
        self.quarantine: StagedFile | None = None

    def stage_quarantine(self) -> Path:
        """Return the temporary path of the quarantine file, staging it on first use."""
        if self.quarantine is None:
            self.quarantine = StagedFile(self.targets.quarantine)
        return self.quarantine.tmp

    def publish(self) -> dict[str, str | None]:
        """Rename every staged file into place, remove stale ones this run did not write; return what is published."""
        published: dict[str, str | None] = {"flagged": str(self.flagged.publish()), "scores": None, "quarantine": None}
        for kind, staged, target in (
            ("scores", self.scores, self.targets.scores),
            ("quarantine", self.quarantine, self.targets.quarantine),
        ):
            if staged is not None:
                published[kind] = str(staged.publish())
            else:
                storage.remove(target)
        return published

    def discard(self) -> None:
        """Remove every staged file; the published outputs stay as they were."""
        for staged in (self.flagged, self.scores, self.quarantine):
            if staged is not None:
                staged.discard()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # Whatever was not published by the end of the block is discarded.
        self.discard()
