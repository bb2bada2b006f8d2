"""Fixing the anomaly threshold on held-out normal rows, and the calibration kept beside it."""

from __future__ import annotations

import math

import numpy as np

from data.errors import ParameterError, TrainingDataError

MIN_ROWS_ABOVE_THRESHOLD = 10
CALIBRATION_QUANTILES = (50.0, 90.0, 95.0, 98.0, 99.0, 99.9)


def min_holdout_rows(percentile: float) -> int:
    """Return the held-out rows needed so that at least 10 lie above the ``percentile``."""
    return math.ceil(MIN_ROWS_ABOVE_THRESHOLD / (1.0 - percentile / 100.0))


def check_percentile(percentile: float) -> float:
    """Return ``percentile`` if it is strictly between 0 and 100, else raise naming the parameter."""
    if not (0.0 < percentile < 100.0) or not math.isfinite(percentile):
        raise ParameterError(f"percentile={percentile!r} must be strictly between 0 and 100 (98 flags about 2% of normal rows)")
    return float(percentile)


def fix_threshold(holdout_errors: np.ndarray, percentile: float) -> float:
    """Return the ``percentile`` of reconstruction errors of held-out normal rows: the fixed threshold."""
    check_percentile(percentile)
    errors = np.asarray(holdout_errors, dtype=np.float64)
    needed = min_holdout_rows(percentile)
    if len(errors) < needed:
        raise TrainingDataError(
            f"only {len(errors)} held-out normal rows; the {percentile:g}th percentile needs at least {needed} "
            f"(add normal training rows or raise holdout_fraction)"
        )
    if not np.isfinite(errors).all():
        raise TrainingDataError("reconstruction errors of held-out rows are not all finite: training diverged; lower the learning rate")
    threshold = float(np.percentile(errors, percentile))
    if not math.isfinite(threshold) or threshold <= 0.0:
        raise TrainingDataError(
            f"the {percentile:g}th percentile of held-out reconstruction errors is {threshold!r}: every row would be flagged "
            "(zero) or none could be; the normal rows are probably constant or duplicated, check the training data's features"
        )
    return threshold


def calibration_stats(holdout_errors: np.ndarray) -> dict[str, object]:
    """Summarise the error distribution of held-out normal rows for the bundle and reports."""
    errors = np.asarray(holdout_errors, dtype=np.float64)
    return {
        "rows": int(len(errors)),
        "mean": float(errors.mean()),
        "std": float(errors.std()),
        "min": float(errors.min()),
        "max": float(errors.max()),
        "quantiles": {f"{q:g}": float(np.percentile(errors, q)) for q in CALIBRATION_QUANTILES},
    }
