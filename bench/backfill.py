"""Backfill: five past dates scored by one ``anomaly backfill`` beside five ``anomaly score --run-date`` commands.

Both on copies of one workspace (its current model, the same nights), each command a new process with its
own embedded Prefect server, as a user runs them by hand; wall times side by side, and their ratio.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from typing import Any

import numpy as np

from bench.commands import run_anomaly
from bench.datasets import write_large_batch
from data.workspace import Workspace

FIRST_DATE = dt.date(2001, 1, 1)
DATES = 5


def backfill(workspace: Workspace, rows_per_date: int, rows_like: tuple[np.ndarray, np.ndarray], log) -> dict[str, Any]:
    """Time one backfill of DATES dates against one scoring command per date, on copies of ``workspace``."""
    dates = [FIRST_DATE + dt.timedelta(days=k) for k in range(DATES)]
    copies = {}
    for way in ("backfill", "single_dates"):
        root = workspace.root.parent / f"backfill-{way}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(workspace.models_dir, root / "models")
        for k, day in enumerate(dates):
            night = Workspace.at(root).incoming_for(day) / "night.parquet"
            write_large_batch(night, rows_per_date, len(rows_like[0]), seed=100 + k, distribution=rows_like)
        copies[way] = root
    started = time.perf_counter()
    line = run_anomaly(
        "backfill",
        "--start-date",
        dates[0].isoformat(),
        "--end-date",
        dates[-1].isoformat(),
        "--workspace",
        str(copies["backfill"]),
    )
    backfill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    where = str(copies["single_dates"])
    singles = [
        run_anomaly("score", "--run-date", day.isoformat(), "--catch-up-days", "0", "--workspace", where)
        for day in dates
    ]
    single_seconds = time.perf_counter() - started
    rows = sum(s["rows_scored"] for s in singles)
    if line["rows_scored"] != rows:
        raise RuntimeError(f"the backfill scored {line['rows_scored']} rows, the single dates {rows}")
    ratio = backfill_seconds / single_seconds
    log(f"backfill of {DATES} dates: {backfill_seconds:.1f} s; date by date {single_seconds:.1f} s ({ratio:.2f})")
    return {
        "dates": DATES,
        "rows_per_date": rows_per_date,
        "backfill_seconds": backfill_seconds,
        "single_date_runs_seconds": single_seconds,
        "ratio": ratio,
    }
