"""Finding the batches of a night and recording which were scored, by which model."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.atomic import write_json_atomic
from data.errors import NoBatchesError, ParameterError
from data.parquet import content_hash, resolve_parquet_files
from data.workspace import Workspace

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Batch:
    """One input file and the name its outputs carry."""

    name: str
    path: Path


def batch_name(path: Path, root: Path | None = None) -> str:
    """Return a file-system-safe batch name: the path below ``root`` (or the stem), with '/' as '__'."""
    relative = path.relative_to(root) if root is not None and path.is_relative_to(root) else Path(path.name)
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
        folder = workspace.incoming_for(run_date)
        files = resolve_parquet_files(folder) if folder.is_dir() else []
        if not files:
            raise NoBatchesError(f"{folder}: no .parquet batches for run_date={run_date.isoformat()}; put files there or pass batch_paths")
        found = [Batch(batch_name(f, folder), f) for f in files]
    names: dict[str, Path] = {}
    for batch in found:
        if batch.name in names and names[batch.name] != batch.path:
            raise ParameterError(f"batch_paths: {names[batch.name]} and {batch.path} would both write outputs named {batch.name!r}; rename one")
        names[batch.name] = batch.path
    return sorted({b.path: b for b in found}.values(), key=lambda b: b.name)


def record_path(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return where the manifest record of one scored batch lives."""
    return workspace.state_dir / "scored" / f"date={run_date.isoformat()}" / f"{batch}.json"


def rejection_path(workspace: Workspace, run_date: dt.date, batch: str) -> Path:
    """Return where the reason a whole file was rejected on a date is recorded."""
    # Beside, not inside, the quarantine partition: that one must stay a pure Parquet dataset for its readers.
    return workspace.output_partition("rejected", run_date) / f"{batch}.json"


def read_record(workspace: Workspace, run_date: dt.date, batch: str) -> dict[str, Any] | None:
    """Return the manifest record of a batch, or None if it was never scored (or the record is unreadable)."""
    try:
        return json.loads(record_path(workspace, run_date, batch).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def already_scored(workspace: Workspace, run_date: dt.date, batch: Batch, model_version: str) -> bool:
    """Return True if ``batch`` was scored by ``model_version`` and its content has not changed since."""
    record = read_record(workspace, run_date, batch.name)
    if not record or record.get("model_version") != model_version or record.get("size") != batch.path.stat().st_size:
        return False
    # Hashing every time (not trusting time stamps) catches a file rewritten in place with the same size.
    return record.get("content_sha256") == content_hash(batch.path)


def write_record(workspace: Workspace, run_date: dt.date, batch: Batch, model_version: str, result: dict[str, Any]) -> Path:
    """Record that ``batch`` was scored; call only once its outputs are in place.

    The file's SHA-256 comes from ``result["content_sha256"]`` where the scoring computed it, else it is computed here.
    """
    stat = batch.path.stat()
    record = {
        "batch": batch.name,
        "source": os.fspath(batch.path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "content_sha256": result.get("content_sha256") or content_hash(batch.path),
        "model_version": model_version,
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(),
        **{k: result[k] for k in ("rows_read", "rows_scored", "rows_flagged", "rows_quarantined", "outputs") if k in result},
    }
    path = write_json_atomic(record_path(workspace, run_date, batch.name), record)
    # A file scored after an earlier run rejected it is rejected no more.
    rejection_path(workspace, run_date, batch.name).unlink(missing_ok=True)
    return path
