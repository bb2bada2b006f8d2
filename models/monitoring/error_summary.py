"""Summaries of scored rows that take constant memory however many rows they cover, and add up across batches.

Errors are counted per label class (normal, anomaly, unlabelled) into fine logarithmic bins
around the threshold. Counts, flag rates and confusion matrices are exact (flags are counted
against the threshold itself); quantiles, ROC-AUC and PR-AUC come from the bins: bins 0.1% wide
keep quantiles within 0.1% of exact and the AUCs within 0.001 of scikit-learn's on the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.parquet import ANOMALY, NORMAL, UNLABELLED
from models.monitoring.reasons import ReasonTally

# Bins cover thresholds x 1e-6 .. x 1e6 on a log scale, 0.1% wide; one more bin below, one above.
LOG_SPAN = float(np.log(1e6))
LOG_STEP = 0.001
FINE_BINS = int(round(2 * LOG_SPAN / LOG_STEP)) + 2
DISPLAY_BINS = 60
DISPLAY_SPAN = 4.0  # the display histogram covers [0, 4 x threshold]; anything beyond lands in its last bin
QUANTILE_LEVELS = (50.0, 90.0, 98.0, 99.0)
CLASSES = {"normal": NORMAL, "anomaly": ANOMALY, "unlabelled": UNLABELLED}
# Each class's column in the per-chunk counts: its code + 1, so that UNLABELLED (-1) is column 0.
CLASS_SLOTS = {name: code + 1 for name, code in CLASSES.items()}


def display_edges(threshold: float) -> np.ndarray:
    """Return the display histogram's bin edges, fixed by the threshold so that histograms add up."""
    return np.linspace(0.0, DISPLAY_SPAN * threshold, DISPLAY_BINS + 1)


def fine_index(errors: np.ndarray, threshold: float) -> np.ndarray:
    """Return the fine bin each error falls in."""
    # Single precision and in place: this runs on every chunk scored, and float32 places an error
    # within a thousandth of a bin.
    position = np.asarray(errors, dtype=np.float32) * np.float32(1.0 / threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.log(position, out=position)
    position *= np.float32(1.0 / LOG_STEP)
    position += np.float32(LOG_SPAN / LOG_STEP + 1.0)
    np.fmax(position, np.float32(0.0), out=position)  # zero errors (and NaN) land in the bin below the range
    np.minimum(position, np.float32(FINE_BINS - 1), out=position)  # huge ones in the bin above
    return position.astype(np.intp)


def _fine_lower_edge(index: np.ndarray | int, threshold: float) -> np.ndarray:
    return threshold * np.exp((np.asarray(index, dtype=np.float64) - 1) * LOG_STEP - LOG_SPAN)


@dataclass
class ErrorDistribution:
    """Per-class counts of reconstruction errors in fine bins, with exact flag counts; mergeable and JSON-able."""

    threshold: float
    fine: dict[str, np.ndarray] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in CLASSES:
            self.fine.setdefault(name, np.zeros(FINE_BINS, dtype=np.int64))
            self.flagged.setdefault(name, 0)

    def add(self, errors: np.ndarray, classes: np.ndarray | None = None) -> None:
        """Count one chunk of errors; ``classes`` holds each row's label class (None: all unlabelled)."""
        errors = np.asarray(errors, dtype=np.float64)
        index = fine_index(errors, self.threshold)
        above = errors > self.threshold
        if classes is None:
            self.fine["unlabelled"] += np.bincount(index, minlength=FINE_BINS)
            self.flagged["unlabelled"] += int(np.count_nonzero(above))
            return
        # One bincount over (bin, class) pairs rather than one per class: this runs on every chunk scored.
        n_classes = len(CLASSES)
        slot = np.asarray(classes, dtype=np.intp) + 1
        fine = np.bincount(index * n_classes + slot, minlength=FINE_BINS * n_classes).reshape(FINE_BINS, n_classes)
        flagged = np.bincount(slot[above], minlength=n_classes)
        for name, column in CLASS_SLOTS.items():
            self.fine[name] += fine[:, column]
            self.flagged[name] += int(flagged[column])

    def merge(self, other: ErrorDistribution) -> ErrorDistribution:
        """Add another distribution over the same threshold into this one and return it."""
        if other.threshold != self.threshold:
            raise ValueError(f"cannot add error distributions of thresholds {other.threshold!r} and {self.threshold!r}")
        for name in CLASSES:
            self.fine[name] += other.fine[name]
            self.flagged[name] += other.flagged[name]
        return self

    def rows(self, name: str | None = None) -> int:
        """Rows counted in one class, or in all of them."""
        names = [name] if name else list(CLASSES)
        return int(sum(self.fine[n].sum() for n in names))

    def to_json(self) -> dict[str, Any]:
        """Return a compact JSON form: each class's non-zero fine bins and their counts.

        A batch of a few hundred rows fills a few hundred of the tens of thousands of bins, so listing
        only those keeps each batch report small, which a night of thousands of small files writes and reads.
        """
        fine = {}
        for name, counts in self.fine.items():
            bins = np.flatnonzero(counts)
            fine[name] = {"bins": bins.tolist(), "counts": counts[bins].tolist()}
        return {
            "threshold": self.threshold,
            "log_step": LOG_STEP,
            "log_span": LOG_SPAN,
            "fine": fine,
            "flagged": dict(self.flagged),
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ErrorDistribution:
        """Rebuild a distribution written by :meth:`to_json`, or by earlier versions (a span from ``start``)."""
        if payload.get("log_step") != LOG_STEP or payload.get("log_span") != LOG_SPAN:
            raise ValueError("error distribution was written with other bins")
        fine = {}
        for name, part in payload["fine"].items():
            counts = np.zeros(FINE_BINS, dtype=np.int64)
            if "bins" in part:
                counts[np.asarray(part["bins"], dtype=np.intp)] = part["counts"]
            else:
                counts[part["start"] : part["start"] + len(part["counts"])] = part["counts"]
            fine[name] = counts
        return cls(float(payload["threshold"]), fine, {k: int(v) for k, v in payload["flagged"].items()})

    def display_counts(self, name: str) -> np.ndarray:
        """Return one class's counts in the display histogram's bins, each fine bin counted where its middle falls."""
        middles = _fine_lower_edge(np.arange(FINE_BINS) + 0.5, self.threshold)
        middles[0] = 0.0
        index = np.minimum(
            (middles * (DISPLAY_BINS / (DISPLAY_SPAN * self.threshold))).astype(np.intp), DISPLAY_BINS - 1
        )
        return np.bincount(index, weights=self.fine[name], minlength=DISPLAY_BINS).astype(np.int64)

    def quantiles(self, levels: tuple[float, ...] = QUANTILE_LEVELS) -> dict[str, float]:
        """Return error quantiles over every row, interpolated within the fine bins."""
        counts = sum(self.fine.values())
        total = int(counts.sum())
        if not total:
            return {}
        cumulative = np.cumsum(counts)
        out = {}
        for level in levels:
            rank = level / 100.0 * (total - 1)
            index = int(np.searchsorted(cumulative, rank, side="right"))
            below = cumulative[index - 1] if index else 0
            share = (rank - below + 0.5) / counts[index] if counts[index] else 0.0
            low = 0.0 if index == 0 else float(_fine_lower_edge(index, self.threshold))
            high = float(_fine_lower_edge(index + 1, self.threshold))
            # Geometric within a bin, as the bins are; the lowest bin reaches down to zero.
            value = low + (high - low) * share if index == 0 else low * (high / low) ** min(max(share, 0.0), 1.0)
            out[f"{level:g}"] = value
        return out

    def ranking_quality(self) -> tuple[float | None, float | None]:
        """Return ROC-AUC and PR-AUC (average precision) of the anomaly class over labelled rows.

        Return None unless both classes are present.
        """
        negatives, positives = self.fine["normal"], self.fine["anomaly"]
        n_neg, n_pos = int(negatives.sum()), int(positives.sum())
        if not n_neg or not n_pos:
            return None, None
        below = np.cumsum(negatives) - negatives  # normal rows in lower bins
        # Rows in one bin count as ties, which scikit-learn scores one half.
        roc_auc = float(np.sum(positives * (below + 0.5 * negatives)) / (n_pos * n_neg))
        # Average precision: from the highest bin down, precision at each bin holding anomalies,
        # weighted by the recall it adds.
        tp = np.cumsum(positives[::-1])
        fp = np.cumsum(negatives[::-1])
        hits = positives[::-1] > 0
        precision = tp[hits] / (tp[hits] + fp[hits])
        pr_auc = float(np.sum(precision * positives[::-1][hits]) / n_pos)
        return roc_auc, pr_auc


def classification_report_from_confusion(matrix: list[list[int]]) -> dict[str, Any]:
    """Return scikit-learn's per-class report from a 2x2 confusion matrix.

    It has the form of ``classification_report(output_dict=True)``.
    """
    (tn, fp), (fn, tp) = matrix
    report: dict[str, Any] = {}
    for name, hit, false_pos, miss in (("normal", tn, fn, fp), ("anomaly", tp, fp, fn)):
        precision = hit / (hit + false_pos) if hit + false_pos else 0.0
        recall = hit / (hit + miss) if hit + miss else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1-score": f1, "support": int(hit + miss)}
    report["accuracy"] = (tn + tp) / max(1, tn + fp + fn + tp)
    return report


def summarize(distribution: ErrorDistribution, percentile: float) -> dict[str, Any]:
    """Summarise a distribution: counts, flag rate, quantiles, display histogram, label metrics.

    The flag rate is set against the expected rate.
    """
    threshold = distribution.threshold
    rows = distribution.rows()
    flagged = sum(distribution.flagged.values())
    labelled = distribution.rows("normal") + distribution.rows("anomaly")
    display = {name: distribution.display_counts(name) for name in CLASSES}
    summary: dict[str, Any] = {
        "rows_scored": rows,
        "rows_flagged": flagged,
        "flag_rate": flagged / rows if rows else 0.0,
        "expected_flag_rate": round(1.0 - percentile / 100.0, 10),
        "threshold": float(threshold),
        "percentile": float(percentile),
        "rows_labelled": labelled,
        "rows_unlabelled": distribution.rows("unlabelled"),
        "error_quantiles": distribution.quantiles(),
        "histogram": {
            "edges": display_edges(threshold).tolist(),
            "counts": [int(c) for c in sum(display.values())],
            "counts_by_class": {name: counts.tolist() for name, counts in display.items() if counts.any()},
        },
        "labels": None,
        "error_distribution": distribution.to_json(),
    }
    if labelled:
        normal_rows, anomaly_rows = distribution.rows("normal"), distribution.rows("anomaly")
        fp, tp = distribution.flagged["normal"], distribution.flagged["anomaly"]
        matrix = [[normal_rows - fp, fp], [anomaly_rows - tp, tp]]
        roc_auc, pr_auc = distribution.ranking_quality()
        summary["labels"] = {
            "classification_report": classification_report_from_confusion(matrix),
            "confusion_matrix": {"labels": ["normal", "anomaly"], "rows_true_columns_predicted": matrix},
            "roc_auc": roc_auc,
            "pr_auc": pr_auc,
        }
    return summary


def summarize_errors(
    errors: np.ndarray, threshold: float, percentile: float, classes: np.ndarray | None
) -> dict[str, Any]:
    """Summarise errors held in memory: as :func:`summarize`, with quantiles and AUCs computed exactly."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    errors = np.asarray(errors, dtype=np.float64)
    distribution = ErrorDistribution(float(threshold))
    distribution.add(errors, classes)
    summary = summarize(distribution, percentile)
    if len(errors):
        summary["error_quantiles"] = {
            f"{q:g}": float(v) for q, v in zip(QUANTILE_LEVELS, np.percentile(errors, QUANTILE_LEVELS), strict=True)
        }
    if summary["labels"] and summary["labels"]["roc_auc"] is not None:
        labelled = classes != UNLABELLED
        truth = classes[labelled] == ANOMALY
        summary["labels"]["roc_auc"] = float(roc_auc_score(truth, errors[labelled]))
        summary["labels"]["pr_auc"] = float(average_precision_score(truth, errors[labelled]))
    return summary


def merge_counts(payloads: Sequence[list[list[int]] | None]) -> list[list[int]] | None:
    """Add up the feature bin counts of several summaries; None when any of them has none (older outputs)."""
    if not payloads or any(p is None for p in payloads):
        return None
    counts = [np.asarray(p, dtype=np.int64) for p in payloads]
    # Counts written before the missing-value column was kept are one column short: they counted no missing value.
    slots = max(c.shape[1] for c in counts)
    return np.sum([np.pad(c, ((0, 0), (0, slots - c.shape[1]))) for c in counts], axis=0).tolist()


def combine(summaries: list[dict[str, Any]], threshold: float, percentile: float) -> dict[str, Any]:
    """Add up summaries of several batches scored with one threshold into one summary.

    Reasons and feature bin counts are added up too, where the summaries have them.
    """
    total = ErrorDistribution(float(threshold))
    reasons: ReasonTally | None = None
    for summary in summaries:
        total.merge(ErrorDistribution.from_json(summary["error_distribution"]))
        if summary.get("reasons"):
            tally = ReasonTally.from_json(summary["reasons"])
            reasons = tally if reasons is None else reasons.merge(tally)
    combined = summarize(total, percentile)
    combined["feature_bins"] = merge_counts([s.get("feature_bins") for s in summaries])
    if reasons is not None:
        combined["reasons"] = reasons.to_json()
    return combined
