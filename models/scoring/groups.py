"""Many small files as few work units: grouping a run's files by rows, and scoring a group's files with one task.

A night of thousands of small files would otherwise pay a task run, a model check and a report per
file; a group pays them once. Each file in a group is still scored, checked and published on its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from data import storage
from data.batches import Batch
from data.errors import BatchFileError
from data.parquet import open_parquet
from data.workspace import Workspace
from models.bundle import LoadedBundle, load_bundle
from models.scoring.batch import BatchResult, describe_failure, score_batch
from models.scoring.streaming import ScoringOptions

Work = list[tuple[dt.date, Batch]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkGroup:
    """Positions in a run's work scored together, and their rows (None where a file's footer could not be read)."""

    positions: list[int]
    rows: int | None

    def is_large_file(self, rows_per_unit: int) -> bool:
        """Return True for a lone file of at least ``rows_per_unit`` rows (or one whose size is unknown)."""
        return len(self.positions) == 1 and (self.rows is None or self.rows >= rows_per_unit)


def footer_rows(batch: Batch) -> int | None:
    """Return the rows a file's Parquet footer declares, or None if it cannot be read (scoring then says why)."""
    try:
        return open_parquet(batch.path).metadata.num_rows
    except BatchFileError as exc:
        if exc.transient:
            raise  # the planning task retries it
        return None


def group_work(work: Work, rows_per_unit: int) -> list[WorkGroup]:
    """Group the files of ``work``, in order, into units of at most ``rows_per_unit`` rows.

    A file of that many rows or more, or one whose footer cannot be read, is a group of its own.
    """
    groups: list[WorkGroup] = []
    positions: list[int] = []
    rows = 0
    for position, (_, batch) in enumerate(work):
        file_rows = footer_rows(batch)
        if file_rows is None or file_rows >= rows_per_unit:
            groups.append(WorkGroup([position], file_rows))
            continue
        if positions and rows + file_rows > rows_per_unit:
            groups.append(WorkGroup(positions, rows))
            positions, rows = [], 0
        positions.append(position)
        rows += file_rows
    if positions:
        groups.append(WorkGroup(positions, rows))
    return sorted(groups, key=lambda g: g.positions[0])


def score_group(
    workspace_root: str, items: Work, model_version: str, options: ScoringOptions
) -> list[BatchResult | dict[str, Any]]:
    """Score and publish each file of a group in turn; return its result, or why it failed (see ``describe_failure``).

    The model is loaded once for the group. Each file fails on its own, as if scored alone: bad input
    at once, a transient I/O error after the retries a task of its own would have had.
    """
    bundle = load_bundle(Workspace.at(workspace_root).version_dir(model_version))
    return [_score_with_retries(workspace_root, run_date, batch, bundle, options) for run_date, batch in items]


def _score_with_retries(
    workspace_root: str, run_date: dt.date, batch: Batch, bundle: LoadedBundle, options: ScoringOptions
) -> BatchResult | dict[str, Any]:
    attempt = 0
    while True:
        try:
            return score_batch(workspace_root, run_date, batch, bundle, options)
        except Exception as exc:  # every failure of one file is that file's rejection, as for a file scored alone
            if attempt == storage.TRANSIENT_RETRIES or not storage.worth_retrying(exc):
                return describe_failure(exc, str(batch.path))
            log.warning("%s: %s; retrying in %d s", batch.path, exc, storage.TRANSIENT_RETRY_DELAY_S)
        attempt += 1
        time.sleep(storage.TRANSIENT_RETRY_DELAY_S)
