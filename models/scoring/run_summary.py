"""The summary of a date and of a scoring run.

A date's summary covers every batch of it published by one model, added up from their reports in constant memory.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

from data import batches, storage
from data.outputs import batch_report_dir
from data.workspace import Workspace
from models.bundle import read_bundle_json
from models.evaluation.reports import anomaly_class_metrics
from models.monitoring.drift import with_drift
from models.monitoring.error_summary import combine
from models.scoring.batch import BatchResult, with_flag_rate_verdict
from models.scoring.streaming import RowCounts


def summarize_date(workspace_root: str, run_date: dt.date, model_version: str) -> dict[str, Any]:
    """Combine the reports of the date's batches that ``model_version`` published into one summary.

    Their manifest records tell which batches it published.
    """
    workspace = Workspace.at(workspace_root)
    meta = read_bundle_json(workspace.version_dir(model_version))
    records = batches.recorded_batches(workspace, run_date, model_version)
    report_dir = batch_report_dir(workspace, run_date)
    summaries = [storage.read_json(report_dir / f"{record['batch']}.json") for record in records]
    summary = combine(summaries, float(meta["threshold"]["value"]), float(meta["threshold"]["percentile"]))
    summary["rows_read"] = sum(int(r.get("rows_read", r.get("rows_scored", 0))) for r in records)
    summary["rows_quarantined"] = sum(int(r.get("rows_quarantined", 0)) for r in records)
    summary["batches"] = [r["batch"] for r in records]
    unseen = Counter()
    for batch_summary in summaries:
        unseen.update(batch_summary.get("unseen_categories") or {})
    summary["unseen_categories"] = dict(unseen)
    return with_drift(with_flag_rate_verdict(summary, meta), meta)


@dataclass(frozen=True)
class ScoringRun:
    """What one scoring run did: the batches it published, skipped and failed, and the late files it caught up."""

    date: dt.date
    model_version: str
    threshold: float
    scored: list[BatchResult]
    skipped: list[str]
    failed: list[dict[str, Any]]
    caught_up: list[dict[str, str]]

    def dates_reported(self) -> list[dt.date]:
        """Return the run's date, then every earlier date that got late files, oldest first."""
        return [self.date, *sorted({r.run_date for r in self.scored} - {self.date})]

    def batches_scored_on(self, day: dt.date) -> int:
        """Return how many batches of ``day`` this run published."""
        return sum(r.run_date == day for r in self.scored)

    def report_context(self, day: dt.date) -> dict[str, Any]:
        """Return the header figures of ``day``'s run report."""
        return {
            "date": day.isoformat(),
            "model_version": self.model_version,
            "batches_scored": self.batches_scored_on(day),
            "batches_skipped": len(self.skipped) if day == self.date else 0,
            "batches_failed": sum(f["date"] == day.isoformat() for f in self.failed),
        }

    def artifact_rows(self) -> list[dict[str, Any]]:
        """Return one row per published or failed batch, for the run's table artifact."""
        published = [
            {
                "date": r.run_date.isoformat(),
                "batch": r.batch,
                **r.row_counts(),
                "flag_rate": round(r.summary["flag_rate"], 6),
                "error": None,
            }
            for r in self.scored
        ]
        unscored = {**RowCounts(0, 0, 0, 0).row_counts(), "flag_rate": None}
        return published + [
            {"date": f["date"], "batch": f["batch"], **unscored, "error": f["error"]} for f in self.failed
        ]

    def outcome(
        self, summary: dict[str, Any], report_paths: dict[str, str], workspace: Workspace, write_scores: bool
    ) -> dict[str, Any]:
        """Return the run's JSON outcome from the date's summary and run report."""
        return {
            "date": self.date.isoformat(),
            "model_version": self.model_version,
            "threshold": self.threshold,
            "batches_scored": self.batches_scored_on(self.date),
            "batches_skipped": len(self.skipped),
            "batches_failed": len(self.failed),
            "rows_read": summary["rows_read"],
            "rows_scored": summary["rows_scored"],
            "rows_flagged": summary["rows_flagged"],
            "rows_quarantined": summary["rows_quarantined"],
            "rows_unlabelled": summary["rows_unlabelled"] if summary["labels"] else None,
            "flag_rate": summary["flag_rate"] if summary["rows_scored"] else None,
            "expected_flag_rate": summary["expected_flag_rate"],
            "flag_rate_band": summary["flag_rate_band"],
            "flag_rate_verdict": summary["flag_rate_verdict"],
            "alarm": summary["alarm"],
            "alarm_reasons": summary["alarm_reasons"],
            **anomaly_class_metrics(summary),
            "catch_up_batches": self.caught_up,
            "flagged_dir": str(workspace.output_partition("flagged", self.date)),
            "scores_dir": str(workspace.output_partition("scores", self.date)) if write_scores else None,
            "report": report_paths["markdown"],
            "report_json": report_paths["json"],
            "failed": self.failed,
        }


BACKFILL_STATUSES = ("scored", "failed", "already_scored", "no_batches")
# What a backfill reports of each date, from the scoring run's outcome.
BACKFILL_DATE_KEYS = (
    "batches_scored", "batches_skipped", "batches_failed", "rows_scored", "rows_flagged", "rows_quarantined",
    "flag_rate", "alarm", "report",
)  # fmt: skip


def backfill_date(day: dt.date, status: str, outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return one date of a backfill: its status (scored, failed, already_scored, no_batches) and its figures."""
    return {"date": day.isoformat(), "status": status, **{k: (outcome or {}).get(k) for k in BACKFILL_DATE_KEYS}}


def backfill_outcome(first: dt.date, last: dt.date, model_version: str, dates: list[dict[str, Any]]) -> dict[str, Any]:
    """Return a backfill's JSON outcome: the range, the model, each date, and the dates by status."""
    by_status = {status: [d["date"] for d in dates if d["status"] == status] for status in BACKFILL_STATUSES}
    return {
        "start_date": first.isoformat(),
        "end_date": last.isoformat(),
        "model_version": model_version,
        **{f"dates_{status}": names for status, names in by_status.items()},
        "rows_scored": sum(d["rows_scored"] or 0 for d in dates),
        "rows_flagged": sum(d["rows_flagged"] or 0 for d in dates),
        "dates": dates,
    }
