"""Drift against the bundle's reference: quiet on normal nights of any size, and naming the feature that moved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data.outputs import batch_outputs
from models.monitoring.drift import (
    PSI_FLOOR,
    FeatureBins,
    alarm_reasons,
    feature_reference,
    measure_drift,
    psi,
    psi_cutoff,
    score_reference,
    with_drift,
)
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from tests.conftest import FEATURES, RUN_DATE, SCORED_AT, current_bundle, make_rows, write_rows


def _score_night(ws, loaded, table: pa.Table, name: str) -> dict:
    source = write_rows(table, ws.incoming_for(RUN_DATE) / f"{name}.parquet")
    result = score_file(
        loaded,
        source,
        name,
        batch_outputs(ws, RUN_DATE, name),
        ScoringOptions(scored_at=SCORED_AT, write_scores=False, reason_count=0),
    )
    return with_drift(result.summary, loaded.metadata)


def _shifted(table: pa.Table, feature: str, by: float) -> pa.Table:
    index = table.schema.get_field_index(feature)
    return table.set_column(index, feature, pa.array(table.column(feature).to_numpy() + by))


@pytest.mark.slow
def test_twenty_large_normal_nights_raise_no_drift_and_a_half_sd_shift_is_named(workspace_copy: Path) -> None:
    ws, loaded = current_bundle(workspace_copy)
    reference = loaded.drift_reference
    assert reference["features"]["names"] == FEATURES
    assert all(sum(counts) == reference["features"]["rows"] for counts in reference["features"]["counts"])
    assert sum(reference["score"]["counts"]) == loaded.metadata["threshold"]["rows"]

    worst = 0.0
    for night in range(20):
        summary = _score_night(ws, loaded, make_rows(100_000, seed=1000 + night), f"normal-{night}")
        drift = summary["drift"]
        assert drift["rows"] == 100_000
        assert not drift["drifted_features"], (night, drift["features"][:2])
        assert not drift["score"]["drifted"], (night, drift["score"])
        assert not [r for r in alarm_reasons(summary, 0) if not r.startswith("flag_rate")]
        worst = max(
            worst,
            drift["features"][0]["psi"] / drift["features"][0]["cutoff"],
            drift["score"]["psi"] / drift["score"]["cutoff"],
        )
    # Not merely below the cut-off: normal nights stay far from it.
    assert worst < 0.5

    summary = _score_night(ws, loaded, _shifted(make_rows(100_000, seed=999), "f3", 0.5), "shifted")
    assert summary["drift"]["drifted_features"] == ["f3"]
    assert "input_drift:f3" in alarm_reasons(summary, 0)
    assert summary["drift"]["features"][0]["feature"] == "f3"


def test_small_nights_need_a_larger_change_but_still_see_a_large_one(workspace_copy: Path) -> None:
    ws, loaded = current_bundle(workspace_copy)
    quiet = _score_night(ws, loaded, make_rows(300, seed=7), "small")
    assert quiet["drift"]["features"][0]["cutoff"] > PSI_FLOOR
    assert not quiet["drift"]["drifted_features"]
    loud = _score_night(ws, loaded, _shifted(make_rows(300, seed=8), "f1", -2.0), "small-shifted")
    assert loud["drift"]["drifted_features"] == ["f1"]


def test_psi_is_zero_for_equal_shares_and_its_cutoff_shrinks_to_the_floor() -> None:
    # Equal shares: zero up to the half row added to each bin.
    assert psi([10, 20, 30], [20, 40, 60])[0] == pytest.approx(0.0, abs=1e-4)
    assert psi([1000, 2000, 3000], [2000, 4000, 6000])[0] < 1e-6
    value, used = psi([100, 0, 100], [0, 0, 200])
    assert used == 2 and np.isfinite(value) and value > 1.0
    cutoffs = [psi_cutoff(16_000, rows, 10, 7) for rows in (50, 500, 5_000, 500_000)]
    assert cutoffs == sorted(cutoffs, reverse=True)
    assert cutoffs[0] > 0.5 and cutoffs[-1] == PSI_FLOOR
    assert psi_cutoff(16_000, 1000, 1, 7) == float("inf")  # a feature constant in training has one bin


def test_feature_bins_count_what_the_reference_counts_and_merge() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(5_000, 3))
    reference = {"features": feature_reference(train, ["a", "b", "c"])}
    assert [sum(c) for c in reference["features"]["counts"]] == [5_000] * 3
    # Deciles: each bin holds about a tenth of the rows the edges came from.
    assert max(max(c) for c in reference["features"]["counts"]) <= 510
    whole = FeatureBins.for_reference(reference)
    whole.add(train[:4_000])
    parts = FeatureBins.for_reference(reference)
    parts.add(train[:2_000])
    parts.merge(FeatureBins.from_counts(reference, _counted(reference, train[2_000:4_000])))
    assert (whole.counts == parts.counts).all()
    assert whole.counts.sum() == 3 * 4_000
    # Its last column counts missing values, of which these rows have none.
    rest = np.asarray(_counted(reference, train[4_000:]))
    assert (whole.counts[:, -1] == 0).all() and (rest[:, -1] == 0).all()
    assert (whole.counts[:, :-1] == np.asarray(reference["features"]["counts"]) - rest[:, :-1]).all()


def test_missing_values_count_in_no_bin_of_the_reference_or_of_a_night() -> None:
    rng = np.random.default_rng(4)
    train = rng.normal(size=(5_000, 2))
    complete = feature_reference(train, ["a", "b"])
    train[::10, 0] = np.nan
    gappy = feature_reference(train, ["a", "b"])
    assert [sum(c) for c in gappy["counts"]] == [4_500, 5_000]
    assert np.allclose(gappy["edges"][0], complete["edges"][0], atol=0.1) and gappy["edges"][1] == complete["edges"][1]
    assert gappy["missing"] == [500, 0] and complete["missing"] == [0, 0]
    night = FeatureBins.for_reference({"features": gappy})
    night.add(train)
    # Each value in its decile, each missing one in the last column.
    assert night.counts[:, :-1].tolist() == gappy["counts"] and night.counts[:, -1].tolist() == [500, 0]


def test_a_feature_missing_far_more_often_than_in_training_drifts() -> None:
    from models.monitoring.error_summary import ErrorDistribution

    rng = np.random.default_rng(5)
    train = rng.normal(size=(20_000, 2))
    train[::50, 0] = np.nan
    reference = {"features": feature_reference(train, ["a", "b"]), "score": score_reference(np.abs(train[:, 1]))}
    night_rows = rng.normal(size=(8_000, 2))
    errors = ErrorDistribution(1.0)
    errors.add(np.abs(night_rows[:, 1]))
    for share, drifted in ((0.02, []), (0.3, ["a"])):
        night = night_rows.copy()
        night[rng.random(len(night)) < share, 0] = np.nan
        bins = FeatureBins.for_reference(reference)
        bins.add(night)
        drift = measure_drift(reference, bins.to_json(), errors)
        assert drift["drifted_features"] == drifted, share
        row = next(r for r in drift["features"] if r["feature"] == "a")
        assert row["reference_missing_share"] == pytest.approx(0.02) and row["night_missing_share"] == pytest.approx(
            share, abs=0.02
        )


def _counted(reference: dict, rows: np.ndarray) -> list[list[int]]:
    bins = FeatureBins.for_reference(reference)
    bins.add(rows)
    return bins.to_json()
