"""Finding the batches of a night and recording which were scored, by which model."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from data import storage
from data.errors import NoBatchesError, ParameterError
from data.parquet import resolve_parquet_files
from data.storage import Fingerprint
from data.workspace import Workspace, check_path_part

# Records of this format go with batch reports the run summary can add up; older ones are scored again.
RECORD_FORMAT = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Batch:
    """One input file and the name its outputs carry."""

    name: str
    path: Path


def batch_name(path: Path, root: Path | None = None) -> str:
    """Return a file-system-safe batch name: the path below ``root`` (or the stem), with '/' as '__'."""
    below = str(root).rstrip("/") + "/" if root is not None else None
    relative = PurePosixPath(str(path)[len(below) :] if below and str(path).startswith(below) else path.name)
    name = "__".join(relative.with_suffix("").parts)
    return _UNSAFE.sub("_", name).lstrip(".") or "batch"


def find_batches(workspace: Workspace, run_date: dt.date, paths: Sequence[str] = ()) -> list[Batch]:
    """Return the batches to score: explicit ``paths`` (files, folders or globs), else incoming/<date>/."""
    if paths:
        found: list[Batch] = []
        for item in paths:
            files = resolve_parquet_files(item)
            if not files:
                raise NoBatchesError(f"batch_paths entry {item!r}: no .parquet files found there")
            found += [Batch(batch_name(f), f) for f in files]
    else:
        found = incoming_batches(workspace, run_date)
        if not found:
            raise NoBatchesError(
                f"{workspace.incoming_for(run_date)}: no .parquet batches for run_date={run_date.isoformat()}; "
                "put files there or pass batch_paths"
            )
    names: dict[str, Path] = {}
    for batch in found:
        if batch.name in names and names[batch.name] != batch.path:
            raise ParameterError(
                f"batch_paths: {names[batch.name]} and {batch.path} would both write outputs named {batch.name!r}; "
                "rename one"
            )
        names[batch.name] = batch.path
    return sorted({b.path: b for b in found}.values(), key=lambda b: b.name)


def incoming_batches(workspace: Workspace, run_date: dt.date) -> list[Batch]:
    """Return the batches in incoming/<date>/ (none when the folder is missing), by name."""
    folder = workspace.incoming_for(run_date)
    files = resolve_parquet_files(folder) if storage.is_dir(folder) else []
    return sorted((Batch(batch_name(f, folder), f) for f in files), key=lambda b: b.name)


def records_dir(workspace: Workspace, run_date: dt.date) -> Path:
    """Return the folder of a date's manifest records."""
    return workspace.state_dir / "scored" / f"date={run_date.isoformat()}"


def record_path(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return where the manifest record of one scored batch lives."""
    return records_dir(workspace, run_date) / f"{batch}.json"


def rejections_dir(workspace: Workspace, run_date: dt.date) -> Path:
    """Return the folder recording the files of a date that were rejected whole."""
    # Beside, not inside, the quarantine partition: that one must stay a pure Parquet dataset for its readers.
    return workspace.output_partition("rejected", run_date)


def rejection_path(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return where the reason a whole file was rejected on a date is recorded."""
    return rejections_dir(workspace, run_date) / f"{batch}.json"


def read_record(workspace: Workspace, run_date: dt.date, batch: str) -> dict[str, Any] | None:
    """Return the manifest record of a batch, or None if it is not published (or the record is unreadable)."""
    return storage.read_json_if_present(record_path(workspace, run_date, batch))


def already_scored(workspace: Workspace, run_date: dt.date, batch: Batch, model_version: str) -> bool:
    """Return True if ``batch`` was scored by ``model_version`` and its content has not changed since."""
    record = read_record(workspace, run_date, batch.name)
    if (
        not record
        or record.get("format") != RECORD_FORMAT
        or record.get("model_version") != model_version
        or record.get("size") != storage.size_and_mtime(batch.path)[0]
    ):
        return False
    # Hashing every time (not trusting time stamps) catches a file rewritten in place with the same size.
    return record.get("content_sha256") == storage.content_hash(batch.path)


def scored_already(workspace: Workspace, run_date: dt.date, found: Sequence[Batch], model_version: str) -> list[Batch]:
    """Return the batches of ``found`` that ``model_version`` scored as they are now."""
    return [batch for batch in found if already_scored(workspace, run_date, batch, model_version)]


def write_record(
    workspace: Workspace,
    run_date: dt.date,
    batch: Batch,
    model_version: str,
    fingerprint: Fingerprint,
    counts: dict[str, Any],
) -> Path:
    """Record that ``batch`` was scored from the bytes ``fingerprint`` names; call only once its outputs are in place.

    The record is what publishes a batch: outputs without one are withdrawn or replaced by the next run.
    """
    record = {
        "format": RECORD_FORMAT,
        "batch": batch.name,
        "source": str(batch.path),
        **fingerprint.to_json(),
        "model_version": model_version,
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(),
        **counts,
    }
    path = storage.write_json(record_path(workspace, run_date, batch.name), record)
    # A file scored after an earlier run rejected it is rejected no more.
    storage.remove(rejection_path(workspace, run_date, batch.name))
    return path


def withdraw_record(workspace: Workspace, run_date: dt.date, batch: str) -> bool:
    """Remove a batch's manifest record before its outputs are replaced.

    A run killed meanwhile then leaves the batch to be scored again.
    """
    return storage.remove(record_path(workspace, run_date, batch))


def write_rejection(workspace: Workspace, run_date: dt.date, batch: Batch, rejection: dict[str, Any]) -> Path:
    """Record why a whole file was not scored, with the fingerprint of the bytes that were refused (when readable)."""
    try:
        refused = storage.fingerprint(batch.path).to_json()
    except OSError:
        refused = {}
    payload = {"batch": batch.name, **rejection, **refused, "rejected_at": dt.datetime.now(dt.UTC).isoformat()}
    return storage.write_json(rejection_path(workspace, run_date, check_path_part(batch.name, "batch")), payload)


def unscored_batches(workspace: Workspace, run_date: dt.date, model_version: str) -> tuple[int, int]:
    """Return how many batches a date's incoming/ folder holds, and how many of them ``model_version`` has not scored.

    A batch scored and changed since counts as not scored.
    """
    found = incoming_batches(workspace, run_date)
    return len(found), len(found) - len(scored_already(workspace, run_date, found, model_version))


def awaits_scoring(workspace: Workspace, run_date: dt.date, batch: Batch) -> bool:
    """Return True for a file with no record that was not rejected as it is now.

    That is a late arrival, or a file replaced after a rejection.
    """
    if read_record(workspace, run_date, batch.name) is not None:
        return False
    rejection = storage.read_json_if_present(rejection_path(workspace, run_date, batch.name))
    if not rejection or "content_sha256" not in rejection:
        return True
    try:
        if (rejection.get("size"), rejection.get("mtime_ns")) != storage.size_and_mtime(batch.path):
            return True
    except OSError:
        return False
    return rejection["content_sha256"] != storage.content_hash(batch.path)


def recorded_batches(workspace: Workspace, run_date: dt.date, model_version: str | None = None) -> list[dict[str, Any]]:
    """Return the manifest records of a date (only those of ``model_version`` when given), by batch name."""
    records = [
        storage.read_json_if_present(path) for path in storage.list_files(records_dir(workspace, run_date), "*.json")
    ]
    return [r for r in records if r and (model_version is None or r.get("model_version") == model_version)]

