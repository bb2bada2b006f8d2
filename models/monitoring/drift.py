"""Drift: how far a night's inputs and scores moved from the normal rows the model learnt, and the night's alarm.

Reference (kept in bundle.json at retraining): for each feature, the deciles of the normal training
rows as bin edges and how many training rows fall in each bin; for the score, the same for the
held-out normal rows' reconstruction errors. Ten numbers a feature, never the rows.

A missing value (NaN, which the model fills in) counts in no decile: the reference keeps how many
training values of each feature were missing, a night's counts carry one more bin for its missing
values, and that bin takes part in the feature's index, so a feature that goes missing far more
often than in training drifts.

Measure: the population stability index, PSI = sum over bins of (q - p) ln(q / p), p the reference
shares and q the night's. With no drift it is, to first order, (1/n + 1/m) times a chi-square with
B - 1 degrees of freedom (n reference rows, m night rows, B bins), so the cut-off is the larger of

- ``PSI_FLOOR`` (0.1, the usual "moderate change" line: a shift of about 0.3 standard deviations of a
  normal feature), so that a large night does not alarm on changes too small to matter, and
- (1/n + 1/m) times the chi-square quantile that leaves ``FALSE_ALARM_RATE`` per night over all
  features and the score together (Bonferroni), so that a small night does not alarm on noise.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.monitoring.error_summary import ErrorDistribution, fine_index

REFERENCE_BINS = 10
PSI_FLOOR = 0.1
FALSE_ALARM_RATE = 0.001
# Rows of each scored chunk counted into the feature bins: an evenly spaced sample keeps the cost to a few
# per cent of scoring, and 8,192 rows a chunk are far more than a PSI cut-off of 0.1 needs.
DRIFT_ROWS_PER_CHUNK = 8192
# Half a row added to every bin that either side uses, so that a bin empty on one side keeps the index finite.
SMOOTHING = 0.5

FLAG_RATE_ABOVE = "flag_rate_above_band"
FLAG_RATE_BELOW = "flag_rate_below_band"
INPUT_DRIFT = "input_drift"
SCORE_DRIFT = "score_drift"
BATCHES_FAILED = "batches_failed"


def quantile_edges(values: np.ndarray, bins: int = REFERENCE_BINS, dtype: type = np.float32) -> np.ndarray:
    """Return the ``bins - 1`` inner edges splitting ``values`` into bins of equal shares.

    The edges are float32, the precision features are scored at.
    """
    levels = np.arange(1, bins) / bins
    values = np.asarray(values, dtype=np.float64)
    # Missing values (NaN) have no place among the deciles; a column missing throughout gets edges of 0.
    present = values[~np.isnan(values)]
    return (np.quantile(present, levels) if len(present) else np.zeros(len(levels))).astype(dtype)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Count ``values`` into the bins that ``edges`` bound (a value equal to an edge goes above it); NaN is left out."""
    values = np.asarray(values, dtype=edges.dtype)
    index = np.searchsorted(edges, values[~np.isnan(values)], side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def feature_reference(
    train_features: np.ndarray,
    feature_names: Sequence[str],
    bins: int = REFERENCE_BINS,
    categorical: Collection[str] = (),
) -> dict[str, Any]:
    """Return each feature's training decile edges, how many rows fall in each bin, and how many are missing.

    A ``categorical`` feature's bins are its codes, one each, so its drift compares category frequencies:
    with fewer values than bins, values unseen in training have a bin of their own; beyond, the last
    bin holds the rest.
    """
    matrix = np.asarray(train_features, dtype=np.float32)
    per_code = np.arange(bins - 1, dtype=np.float32) + np.float32(0.5)
    edges = np.stack(
        [
            per_code if name in categorical else quantile_edges(matrix[:, j], bins)
            for j, name in enumerate(feature_names)
        ]
    )
    counts = np.stack([bin_counts(matrix[:, j], edges[j]) for j in range(matrix.shape[1])])
    return {
        "names": list(feature_names),
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "rows": int(len(matrix)),
        "missing": np.isnan(matrix).sum(axis=0).astype(int).tolist(),
    }


def score_reference(holdout_errors: np.ndarray, bins: int = REFERENCE_BINS) -> dict[str, Any]:
    """Return the decile edges of the held-out normal rows' errors and how many of them fall in each bin."""
    edges = quantile_edges(holdout_errors, bins, np.float64)
    return {
        "edges": edges.tolist(),
        "counts": bin_counts(holdout_errors, edges).tolist(),
        "rows": int(len(holdout_errors)),
    }


def drift_reference(features: dict[str, Any], score: dict[str, Any]) -> dict[str, Any]:
    """Return the drift reference bundle.json keeps."""
    return {"measure": "psi", "bins": len(score["counts"]), "features": features, "score": score}


@dataclass
class FeatureBins:
    """Counts of scored rows in each feature's reference bins; mergeable and JSON-able, like the error distribution.

    The last column counts missing values (NaN).
    """

    edges: np.ndarray  # (features, bins - 1) float32
    counts: np.ndarray  # (features, bins + 1) int64: the bins, then the missing values

    @classmethod
    def for_reference(cls, reference: dict[str, Any]) -> FeatureBins:
        """Return empty counts over a bundle's reference bins."""
        edges = np.asarray(reference["features"]["edges"], dtype=np.float32)
        return cls(edges, np.zeros((edges.shape[0], edges.shape[1] + 2), dtype=np.int64))

    @classmethod
    def from_counts(cls, reference: dict[str, Any], counts: Sequence[Sequence[int]]) -> FeatureBins:
        """Rebuild counts written by :meth:`to_json` over a bundle's reference bins (older ones lack the missing)."""
        bins = cls.for_reference(reference)
        bins.counts += with_missing_column(counts, bins.counts.shape[1])
        return bins

    def add(self, matrix: np.ndarray) -> None:
        """Count an evenly spaced sample of at most ``DRIFT_ROWS_PER_CHUNK`` rows of one chunk.

        The chunk's columns are in the reference's order.

        Chunks are cut the same way whether a file is scored whole or in units, so the sample is too.
        """
        stride = max(1, -(-len(matrix) // DRIFT_ROWS_PER_CHUNK))
        sample = np.asarray(matrix[::stride], dtype=np.float32)
        features, slots = self.counts.shape
        # One comparison per inner edge over the whole sample beats a search per feature.
        index = np.zeros(sample.shape, dtype=np.intp)
        for k in range(self.edges.shape[1]):
            index += sample >= self.edges[:, k]
        index[np.isnan(sample)] = slots - 1
        index += np.arange(features) * slots
        self.counts += np.bincount(index.ravel(), minlength=features * slots).reshape(features, slots)

    def merge(self, other: FeatureBins) -> FeatureBins:
        """Add another count over the same bins into this one and return it."""
        if other.counts.shape != self.counts.shape:
            raise ValueError("cannot add feature bin counts over different bins")
        self.counts += other.counts
        return self

    def to_json(self) -> list[list[int]]:
        """Return the counts (the edges live in the bundle)."""
        return self.counts.tolist()


def with_missing_column(counts: Sequence[Sequence[int]], slots: int) -> np.ndarray:
    """Return feature bin counts with their missing-value column, 0 for counts written before it was kept."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.pad(counts, ((0, 0), (0, slots - counts.shape[1])))


def psi(reference_counts: Sequence[int], observed_counts: Sequence[int]) -> tuple[float, int]:
    """Return the population stability index of ``observed_counts`` against ``reference_counts``.

    The number of bins it used is returned with it.
    """
    p_counts = np.asarray(reference_counts, dtype=np.float64)
    q_counts = np.asarray(observed_counts, dtype=np.float64)
    used = (p_counts + q_counts) > 0
    p_counts, q_counts = p_counts[used] + SMOOTHING, q_counts[used] + SMOOTHING
    p, q = p_counts / p_counts.sum(), q_counts / q_counts.sum()
    return float(np.sum((q - p) * np.log(q / p))), int(used.sum())


def psi_cutoff(reference_rows: int, rows: int, bins_used: int, tests: int) -> float:
    """Return the PSI above which a measure counts as drift.

    That is the floor, or what noise reaches once in 1/FALSE_ALARM_RATE nights.
    """
    from scipy.stats import chi2

    if bins_used < 2 or not reference_rows or not rows:
        return float("inf")
    noise = (1.0 / reference_rows + 1.0 / rows) * float(chi2.isf(FALSE_ALARM_RATE / tests, bins_used - 1))
    return max(PSI_FLOOR, noise)


def score_bin_counts(distribution: ErrorDistribution, edges: Sequence[float]) -> np.ndarray:
    """Count a night's errors into the reference's score bins, from its fine error bins (each placed within 0.1%)."""
    fine = sum(distribution.fine.values())
    cumulative = np.concatenate([[0], np.cumsum(fine)])
    # Rows of the fine bins wholly below an edge's own bin, plus that bin: at most one fine bin misplaced per edge.
    below = cumulative[np.asarray(fine_index(np.asarray(edges, dtype=np.float64), distribution.threshold)) + 1]
    return np.diff(np.concatenate([[0], below, [cumulative[-1]]])).astype(np.int64)


def measure_drift(
    reference: dict[str, Any], feature_counts: Sequence[Sequence[int]] | None, distribution: ErrorDistribution
) -> dict[str, Any]:
    """Return each feature's and the score's PSI against the reference with its cut-off, most drifted first."""
    names = reference["features"]["names"]
    rows = int(distribution.rows())
    tests = len(names) + 1
    features = []
    sampled = int(np.sum(feature_counts[0])) if feature_counts is not None and len(feature_counts) else 0
    if feature_counts is not None:
        n = int(reference["features"]["rows"])
        bins = len(reference["features"]["counts"][0])
        # Missing values are one more bin on both sides, for references that count them.
        missing = reference["features"].get("missing")
        observed_counts = with_missing_column(feature_counts, bins + 1)
        reference_counts = np.asarray(reference["features"]["counts"], dtype=np.int64)
        if missing is not None:
            reference_counts = np.column_stack([reference_counts, missing])
        else:
            observed_counts = observed_counts[:, :bins]
        for name, ref, observed in zip(names, reference_counts, observed_counts, strict=True):
            value, used = psi(ref, observed)
            cutoff = psi_cutoff(n, sampled, used, tests)
            features.append(
                {
                    "feature": name,
                    "psi": value,
                    "cutoff": cutoff,
                    "drifted": value > cutoff,
                    "reference_share": _shares(ref),
                    "night_share": _shares(observed),
                    **(
                        {"reference_missing_share": float(ref[-1] / n), "night_missing_share": _shares(observed)[-1]}
                        if missing is not None
                        else {}
                    ),
                }
            )
        features.sort(key=lambda row: (-row["psi"] / row["cutoff"], row["feature"]))
    score_ref = reference["score"]
    score_observed = score_bin_counts(distribution, score_ref["edges"])
    value, used = psi(score_ref["counts"], score_observed)
    cutoff = psi_cutoff(int(score_ref["rows"]), rows, used, tests)
    return {
        "measure": "psi",
        "floor": PSI_FLOOR,
        "false_alarm_rate": FALSE_ALARM_RATE,
        "rows": rows,
        "rows_sampled_for_features": sampled,
        "reference_rows": int(reference["features"]["rows"]),
        "features": features,
        "drifted_features": [row["feature"] for row in features if row["drifted"]],
        "score": {
            "psi": value,
            "cutoff": cutoff,
            "drifted": value > cutoff,
            "reference_rows": int(score_ref["rows"]),
            "reference_share": _shares(score_ref["counts"]),
            "night_share": _shares(score_observed),
        },
    }


def _shares(counts: Sequence[int]) -> list[float]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return (counts / total if total else counts).tolist()


def with_drift(summary: dict[str, Any], bundle_metadata: dict[str, Any]) -> dict[str, Any]:
    """Add the drift of a summary's rows against the bundle's reference (None without a reference or rows)."""
    reference = bundle_metadata.get("drift_reference")
    drift = None
    if reference and summary["rows_scored"]:
        drift = measure_drift(
            reference, summary.get("feature_bins"), ErrorDistribution.from_json(summary["error_distribution"])
        )
    summary["drift"] = drift
    return summary


def with_alarm(summary: dict[str, Any]) -> dict[str, Any]:
    """Add ``alarm`` and ``alarm_reasons`` to a run summary whose ``failed_batches`` lists the run's failures."""
    summary["alarm_reasons"] = alarm_reasons(summary, len(summary.get("failed_batches") or []))
    summary["alarm"] = bool(summary["alarm_reasons"])
    return summary


def alarm_reasons(summary: dict[str, Any], batches_failed: int) -> list[str]:
    """Return why a night is abnormal: flag rate outside its band, drifted inputs or score, failed batches.

    An empty list means no alarm.
    """
    reasons = []
    verdict = summary.get("flag_rate_verdict")
    if verdict == "above":
        reasons.append(FLAG_RATE_ABOVE)
    elif verdict == "below":
        reasons.append(FLAG_RATE_BELOW)
    drift = summary.get("drift") or {}
    reasons += [f"{INPUT_DRIFT}:{name}" for name in drift.get("drifted_features", [])]
    if (drift.get("score") or {}).get("drifted"):
        reasons.append(SCORE_DRIFT)
    if batches_failed:
        reasons.append(BATCHES_FAILED)
    return reasons
