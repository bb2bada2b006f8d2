"""The summary of a date: every batch of it published by one model, added up from their reports in constant memory."""

from __future__ import annotations

import datetime as dt
from typing import Any

from data import batches, storage
from data.outputs import batch_report_dir
from data.workspace import Workspace
from models.bundle import read_bundle_json
from models.monitoring.drift import with_drift
from models.monitoring.error_summary import combine
from models.scoring.batch import with_flag_rate_verdict


def summarize_date(workspace_root: str, run_date: dt.date, model_version: str) -> dict[str, Any]:
    """Combine the reports of the date's batches that ``model_version`` published (by their manifest records) into one summary."""
    workspace = Workspace.at(workspace_root)
    meta = read_bundle_json(workspace.version_dir(model_version))
    records = batches.recorded_batches(workspace, run_date, model_version)
    report_dir = batch_report_dir(workspace, run_date)
    summaries = [storage.read_json(report_dir / f"{record['batch']}.json") for record in records]
    summary = combine(summaries, float(meta["threshold"]["value"]), float(meta["threshold"]["percentile"]))
    summary["rows_read"] = sum(int(r.get("rows_read", r.get("rows_scored", 0))) for r in records)
    summary["rows_quarantined"] = sum(int(r.get("rows_quarantined", 0)) for r in records)
    summary["batches"] = [r["batch"] for r in records]
    return with_drift(with_flag_rate_verdict(summary, meta), meta)
