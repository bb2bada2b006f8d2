"""Fixing the anomaly threshold on held-out normal rows, and the calibration kept beside it."""

from __future__ import annotations

import functools
import math

import numpy as np

from data.errors import ParameterError, TrainingDataError

CALIBRATION_QUANTILES = (50.0, 90.0, 95.0, 98.0, 99.0, 99.9)
# The threshold is called uncertain when the 95% range of the rate at which normal rows exceed it
# is wider than that rate itself (at p = 98: a range wider than 2 points, below about 770 held-out rows).
WIDE_RANGE_TO_RATE = 1.0


def min_holdout_rows(percentile: float) -> int:
    """Return the fewest held-out rows that can estimate the ``percentile`` at all (50 at p = 98).

    One row must lie above it.
    """
    return math.ceil(round(1.0 / (1.0 - percentile / 100.0), 9))


def exceedance_range(rows: int, percentile: float) -> tuple[float, float]:
    """Return the 95% range of the rate at which normal rows exceed a threshold fixed on ``rows`` held-out rows."""
    from scipy.stats import beta

    k = order_statistic(rows, percentile)
    low, high = beta.ppf([0.025, 0.975], rows - k + 1, k)
    return float(low), float(high)


def threshold_is_wide(rows: int, percentile: float) -> bool:
    """Return whether ``rows`` held-out rows leave the normal flag rate's 95% range wider than the rate itself."""
    low, high = exceedance_range(rows, percentile)
    return high - low > WIDE_RANGE_TO_RATE * (1.0 - percentile / 100.0)


def comfortable_holdout_rows(percentile: float) -> int:
    """Return the fewest held-out rows from which the threshold is no longer called uncertain."""
    low, high = min_holdout_rows(percentile), min_holdout_rows(percentile)
    while threshold_is_wide(high, percentile):
        low, high = high, high * 2
    while low < high:  # the width shrinks as rows grow, up to the order statistic's rounding: good enough for advice
        middle = (low + high) // 2
        low, high = (middle + 1, high) if threshold_is_wide(middle, percentile) else (low, middle)
    return high


def check_percentile(percentile: float) -> float:
    """Return ``percentile`` if it is strictly between 0 and 100, else raise naming the parameter."""
    if not (0.0 < percentile < 100.0) or not math.isfinite(percentile):
        raise ParameterError(
            f"percentile={percentile!r} must be strictly between 0 and 100 (98 flags about 2% of normal rows)"
        )
    return float(percentile)


def fix_threshold(holdout_errors: np.ndarray, percentile: float) -> float:
    """Return the ``percentile`` of reconstruction errors of held-out normal rows: the fixed threshold."""
    check_percentile(percentile)
    errors = np.asarray(holdout_errors, dtype=np.float64)
    needed = min_holdout_rows(percentile)
    if len(errors) < needed:
        raise TrainingDataError(
            f"only {len(errors)} held-out normal rows; the {percentile:g}th percentile cannot be estimated from fewer "
            f"than {needed} "
            f"(add normal training rows or raise holdout_fraction)"
        )
    if not np.isfinite(errors).all():
        raise TrainingDataError(
            "reconstruction errors of held-out rows are not all finite: training diverged; lower the learning rate"
        )
    threshold = float(np.percentile(errors, percentile))
    if not math.isfinite(threshold) or threshold <= 0.0:
        raise TrainingDataError(
            f"the {percentile:g}th percentile of held-out reconstruction errors is {threshold!r}: "
            "every row would be flagged "
            "(zero) or none could be; the normal rows are probably constant or duplicated, "
            "check the training data's features"
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


BAND_LEVEL = 0.99
INTERVAL_LEVEL = 0.95
MIXTURE_NODES = 4000


def order_statistic(rows: int, percentile: float) -> int:
    """Return k, the 1-based rank of the order statistic of ``rows`` errors that the percentile threshold stands at."""
    return min(rows, max(1, math.ceil(percentile / 100.0 * rows)))


def threshold_uncertainty(holdout_errors: np.ndarray, percentile: float) -> dict[str, object]:
    """Return how sure the threshold is: a 95% interval of the percentile, and the Beta law of the normal flag rate.

    With m held-out rows and the threshold at order statistic k, the share of normal rows above it
    follows Beta(m - k + 1, k), whatever the errors' distribution; the interval comes from the
    binomial law of how many of the m rows fall below the true percentile.
    """
    from scipy.stats import binom

    errors = np.sort(np.asarray(holdout_errors, dtype=np.float64))
    m = len(errors)
    p = percentile / 100.0
    k = order_statistic(m, percentile)
    tail = (1.0 - INTERVAL_LEVEL) / 2.0
    lower = int(max(1, binom.ppf(tail, m, p)))
    upper = int(min(m, binom.ppf(1.0 - tail, m, p) + 1))
    return {
        "order_statistic": k,
        "confidence_level": INTERVAL_LEVEL,
        "confidence_interval": [float(errors[lower - 1]), float(errors[upper - 1])],
        "confidence_interval_ranks": [lower, upper],
        "exceedance_rate_beta": {"a": m - k + 1, "b": k},
    }


def threshold_warning(
    uncertainty: dict[str, object], percentile: float, rows_described: str = "held-out normal rows"
) -> str | None:
    """Return a warning when so few normal rows fixed the threshold that the normal flag rate is unsure, else None."""
    shape = uncertainty["exceedance_rate_beta"]
    rows = shape["a"] + shape["b"] - 1
    if not threshold_is_wide(rows, percentile):
        return None
    low, high = exceedance_range(rows, percentile)
    expected = 1.0 - percentile / 100.0
    return (
        f"the threshold rests on {rows} {rows_described}: normal rows will exceed it at a rate anywhere between "
        f"{low:.2%} and {high:.2%} (95%), not exactly {expected:.2%}; from about "
        f"{comfortable_holdout_rows(percentile)} "
        "such rows on, that range is no wider than the rate itself"
    )


@functools.lru_cache(maxsize=4096)
def flag_rate_band(rows: int, beta_a: float, beta_b: float, level: float = BAND_LEVEL) -> tuple[float, float]:
    """Return the ``level`` band of the flag rate an all-normal batch of ``rows`` rows shows.

    The band is beta-binomial: the threshold's uncertainty and the batch's own noise.

    The beta-binomial CDF is the binomial CDF averaged over the Beta law, taken at equal-probability
    nodes; a bisection then finds the quantiles. scipy's own ``betabinom.ppf`` sums the law term by
    term, which takes seconds for a batch of millions of rows.
    """
    from scipy.special import bdtr, betaincinv

    if rows <= 0:
        return (0.0, 0.0)
    rates = betaincinv(beta_a, beta_b, (np.arange(MIXTURE_NODES) + 0.5) / MIXTURE_NODES)

    def quantile(probability: float) -> int:
        low, high = 0, rows  # the smallest count whose CDF reaches ``probability`` lies in [low, high]
        while low < high:
            middle = (low + high) // 2
            if np.mean(bdtr(middle, rows, rates)) >= probability:
                high = middle
            else:
                low = middle + 1
        return low

    tail = (1.0 - level) / 2.0
    return (quantile(tail) / rows, quantile(1.0 - tail) / rows)


@functools.lru_cache(maxsize=16)
def _mixture_rates(beta_a: float, beta_b: float) -> np.ndarray:
    """Return the Beta law's equal-probability nodes, the flag rates the band's mixture averages over."""
    from scipy.special import betaincinv

    rates = betaincinv(beta_a, beta_b, (np.arange(MIXTURE_NODES) + 0.5) / MIXTURE_NODES)
    rates.flags.writeable = False
    return rates


def flag_rate_verdict(rows_flagged: int, rows: int, band: tuple[float, float]) -> str:
    """Return ``within``, ``above`` or ``below``: where the observed flag rate falls against the all-normal band."""
    if rows <= 0:
        return "within"
    rate = rows_flagged / rows
    return "above" if rate > band[1] else "below" if rate < band[0] else "within"
