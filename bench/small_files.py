"""Many small files: one night as thousands of small Parquet files beside the same rows in fewer, larger ones.

Each layout is a copy of one workspace (its current model) scored by one ``anomaly score`` command in a new
process; wall times side by side, and their ratios.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.commands import run_anomaly
from data.workspace import Workspace

NIGHT = dt.date(2002, 1, 1)


def draw_rows(n_rows: int, rows_like: tuple[np.ndarray, np.ndarray], seed: int) -> pa.Table:
    """Return ``n_rows`` drawn like the model's normal rows, with a ``row_id``."""
    mean, cholesky = rows_like
    block = mean + np.random.default_rng(seed).normal(size=(n_rows, len(mean))) @ cholesky.T
    columns = {"row_id": np.arange(n_rows, dtype=np.int64)} | {f"f{j:02d}": block[:, j] for j in range(len(mean))}
    return pa.table(columns)


def write_layout(folder: Path, rows: pa.Table, files: int) -> None:
    """Write ``rows`` as ``files`` Parquet files of equal size, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = rows.num_rows // files
    for k in range(files):
        pq.write_table(rows.slice(k * per_file, per_file), folder / f"part-{k:05d}.parquet")


def score_layout(workspace: Workspace, name: str, rows: pa.Table, files: int) -> dict[str, Any]:
    """Score ``rows`` written as ``files`` files on a copy of ``workspace``; return the seconds and the counts."""
    root = workspace.root.parent / f"small-files-{name}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(workspace.models_dir, root / "models")
    write_layout(Workspace.at(root).incoming_for(NIGHT), rows, files)
    started = time.perf_counter()
    line = run_anomaly("score", "--run-date", NIGHT.isoformat(), "--catch-up-days", "0", "--workspace", str(root))
    seconds = time.perf_counter() - started
    if line["rows_scored"] != rows.num_rows or line["batches_scored"] != files:
        raise RuntimeError(f"{name}: scored {line['batches_scored']} file(s), {line['rows_scored']} rows")
    shutil.rmtree(root)
    return {"files": files, "rows_per_file": rows.num_rows // files, "seconds": seconds}


def small_files(
    workspace: Workspace, rows_like: tuple[np.ndarray, np.ndarray], log, small_rows: int, large_rows: int
) -> dict[str, Any]:
    """Time the same rows as many small files and as few larger ones, in pairs; return the times and ratios."""
    results: dict[str, Any] = {}
    for pair, total, (many, few) in (
        ("small_night", small_rows, (small_rows // 200, 1)),
        ("large_night", large_rows, (large_rows // 200, large_rows // 2_000)),
    ):
        rows = draw_rows(total, rows_like, seed=7)
        many_files = score_layout(workspace, f"{pair}-many", rows, many)
        few_files = score_layout(workspace, f"{pair}-few", rows, few)
        ratio = many_files["seconds"] / few_files["seconds"]
        log(
            f"{many:,} files x {total // many:,} rows: {many_files['seconds']:.1f} s; "
            f"{few:,} file(s) x {total // few:,} rows: {few_files['seconds']:.1f} s ({ratio:.2f})"
        )
        results[pair] = {"many": many_files, "few": few_files, "ratio": ratio}
    return results
