"""How sure the threshold is: its interval, the Beta law of the normal flag rate, and each night's band and verdict."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import beta

from data.outputs import batch_outputs
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from models.threshold import fix_threshold, flag_rate_band, flag_rate_verdict, order_statistic, threshold_uncertainty
from tests.conftest import FEATURES, RUN_DATE, SCORED_AT, current_bundle, make_rows, write_rows


def test_the_normal_flag_rate_follows_the_beta_law_of_the_threshold_whatever_the_errors():
    rng = np.random.default_rng(5)
    m, percentile = 1000, 98.0
    uncertainty = threshold_uncertainty(rng.lognormal(size=m), percentile)
    a, b = uncertainty["exceedance_rate_beta"]["a"], uncertainty["exceedance_rate_beta"]["b"]
    assert (a, b) == (m - order_statistic(m, percentile) + 1, order_statistic(m, percentile)) == (21, 980)
    # Fix thresholds on many held-out samples; the rate at which fresh rows exceed them has that law.
    rates = []
    for _ in range(400):
        holdout = rng.exponential(size=m)
        threshold = np.sort(holdout)[order_statistic(m, percentile) - 1]
        rates.append(np.exp(-threshold))  # exact exceedance probability of an exponential
    assert np.mean(rates) == pytest.approx(beta.mean(a, b), rel=0.05)
    assert np.std(rates) == pytest.approx(beta.std(a, b), rel=0.15)


def test_the_percentile_interval_covers_the_true_percentile_about_95_percent_of_the_time():
    rng = np.random.default_rng(6)
    true = -np.log(0.02)  # the 98th percentile of Exp(1)
    covered = [
        low <= true <= high
        for low, high in (
            threshold_uncertainty(rng.exponential(size=600), 98.0)["confidence_interval"] for _ in range(300)
        )
    ]
    assert 0.92 <= np.mean(covered) <= 0.99


def test_the_band_is_wider_than_binomial_for_large_batches_and_verdicts_follow_it():
    a, b = 21, 980
    low, high = flag_rate_band(1_000_000, a, b)
    binomial_halfwidth = 2.58 * np.sqrt(0.02 * 0.98 / 1_000_000)
    assert high - low > 10 * 2 * binomial_halfwidth, "the threshold's own uncertainty dominates large batches"
    assert low < 0.021 < high
    assert flag_rate_verdict(int(high * 1_000_000) + 1000, 1_000_000, (low, high)) == "above"
    assert flag_rate_verdict(int(low * 1_000_000) - 1000, 1_000_000, (low, high)) == "below"
    assert flag_rate_verdict(21_000, 1_000_000, (low, high)) == "within"


def _errors(loaded, table: pa.Table) -> np.ndarray:
    return loaded.scorer(np.column_stack([table.column(f).to_numpy() for f in FEATURES]))


def test_thirty_normal_nights_fall_within_the_band_and_a_shifted_night_is_above(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    holdout_rows = loaded.metadata["threshold"]["rows"]
    # The band covers two kinds of luck: the night's own, and that of the held-out rows that fixed the
    # threshold. One model draws the second only once, so each night here gets a threshold fixed the
    # way retraining fixes it, on its own held-out sample of the same size.
    verdicts = []
    for night in range(30):
        holdout_errors = _errors(loaded, make_rows(holdout_rows, seed=3000 + night))
        threshold = fix_threshold(holdout_errors, 98.0)
        shape = threshold_uncertainty(holdout_errors, 98.0)["exceedance_rate_beta"]
        flagged = int((_errors(loaded, make_rows(4000, seed=1000 + night)) > threshold).sum())
        verdicts.append(flag_rate_verdict(flagged, 4000, flag_rate_band(4000, shape["a"], shape["b"])))
    assert verdicts.count("within") >= 28, verdicts

    # The product's own summaries carry that band for the bundle's threshold, and a shifted night is above it.
    assert "uncertainty" in loaded.metadata["threshold"]
    normal = write_rows(make_rows(4000, seed=1000), workspace_copy / "in" / "normal.parquet")
    summary = score_file(
        loaded,
        normal,
        "normal",
        batch_outputs(ws, RUN_DATE, "normal"),
        ScoringOptions(scored_at=SCORED_AT, write_scores=False, reason_count=0),
    ).summary
    assert summary["flag_rate_band"] == list(flag_rate_band(4000, *loaded.exceedance_beta))
    assert summary["flag_rate_verdict"] == flag_rate_verdict(summary["rows_flagged"], 4000, summary["flag_rate_band"])
    table = make_rows(4000, seed=2000)
    for name in FEATURES[:3]:
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(table.column(name).to_numpy() + 1.0)
        )
    source = write_rows(table, workspace_copy / "in" / "shifted.parquet")
    result = score_file(
        loaded,
        source,
        "shifted",
        batch_outputs(ws, RUN_DATE, "shifted"),
        ScoringOptions(scored_at=SCORED_AT, write_scores=False, reason_count=0),
    )
    assert result.summary["flag_rate_verdict"] == "above", result.summary["flag_rate"]
    assert result.summary["flag_rate"] > result.summary["flag_rate_band"][1]


@pytest.mark.parametrize(
    ("rows", "a", "b"), [(100, 21, 980), (4000, 21, 980), (50_000, 21, 980), (20_000, 3, 148), (20_000, 201, 9800)]
)
def test_the_fast_band_equals_scipys_beta_binomial_quantiles(rows, a, b):
    from scipy.stats import betabinom

    law = betabinom(rows, a, b)
    expected = (law.ppf(0.005) / rows, law.ppf(0.995) / rows)
    assert flag_rate_band(rows, a, b) == pytest.approx(expected, abs=1.5 / rows)
