from __future__ import annotations

import numpy as np
import pytest

from data.errors import ParameterError, TrainingDataError
from models.config import PRESET_NAMES, PRESETS, resolve_preset
from models.threshold import (
    calibration_stats,
    check_percentile,
    comfortable_holdout_rows,
    exceedance_range,
    fix_threshold,
    min_holdout_rows,
    threshold_is_wide,
    threshold_uncertainty,
    threshold_warning,
)


def test_seed_preset_is_the_tutorial_recipe():
    seed = PRESETS["seed"]
    assert (seed.scale_inputs, seed.encoder_units, seed.decoder_units) == (False, [16, 8, 4], [8, 16])
    assert (seed.output_activation, seed.loss, seed.optimizer, seed.epochs, seed.batch_size) == (
        "sigmoid",
        "mae",
        "adam",
        20,
        64,
    )


def test_default_preset_scales_and_has_linear_output():
    default = PRESETS["default"]
    assert default.scale_inputs and default.output_activation == "linear" and default.loss == "mse"


def test_resolve_preset_applies_overrides_and_ignores_none():
    config = resolve_preset("seed", epochs=3, batch_size=None)
    assert config.epochs == 3 and config.batch_size == 64


def test_resolve_preset_names_unknown_preset_and_bad_override():
    with pytest.raises(ParameterError, match=r"preset='nope' is unknown; choose one of: default, seed"):
        resolve_preset("nope")
    with pytest.raises(ParameterError, match="epochs"):
        resolve_preset("default", epochs=0)


def test_fix_threshold_is_the_percentile_of_holdout_errors_and_flags_two_percent_of_rows_it_never_saw():
    rng = np.random.default_rng(0)
    holdout, unseen = rng.exponential(size=10_000), rng.exponential(size=200_000)
    threshold = fix_threshold(holdout, 98.0)
    assert threshold == pytest.approx(np.percentile(holdout, 98))
    # The threshold's own sampling error (about 0.0014 at 10,000 rows) dominates the 200,000 rows' binomial noise.
    assert (unseen > threshold).mean() == pytest.approx(0.02, abs=0.005)


def test_the_default_recipe_sizes_itself_from_the_features_and_rows():
    default = resolve_preset("default")
    large = default.sized_for(rows=64_000, features=32)
    assert (large.encoder_units, large.decoder_units, large.batch_size, large.early_stopping_patience) == (
        [64, 32, 24],
        [32, 64],
        1024,
        4,
    )
    assert (large.epochs, large.ensemble_size) == (60, 1)
    small = default.sized_for(rows=240, features=64)
    assert (small.encoder_units, small.decoder_units, small.batch_size, small.early_stopping_patience) == (
        [128, 64, 48],
        [64, 128],
        32,
        None,
    )
    assert (small.epochs, small.ensemble_size) == (200, 3)
    assert default.sized_for(rows=19_999, features=64).early_stopping_patience is None
    assert resolve_preset("default", epochs=7).sized_for(rows=240, features=64).epochs == 7
    explicit = resolve_preset("default", batch_size=256, encoder_units=[8, 2], early_stopping_patience=7).sized_for(
        rows=240, features=64
    )
    assert (explicit.encoder_units, explicit.decoder_units, explicit.batch_size, explicit.early_stopping_patience) == (
        [8, 2],
        [8],
        256,
        7,
    )
    assert resolve_preset("seed").sized_for(rows=240, features=64) == resolve_preset("seed")


@pytest.mark.parametrize("errors", [np.zeros(1000), np.r_[np.zeros(990), np.ones(10)]])
def test_fix_threshold_refuses_a_zero_threshold(errors):
    with pytest.raises(TrainingDataError, match="98th percentile of held-out reconstruction errors is 0.0"):
        fix_threshold(errors, 98.0)


def test_fix_threshold_refuses_only_rows_too_few_to_estimate_the_percentile():
    assert (min_holdout_rows(98.0), min_holdout_rows(95.0), min_holdout_rows(99.9)) == (50, 20, 1000)
    with pytest.raises(
        TrainingDataError,
        match="only 49 held-out normal rows; the 98th percentile cannot be estimated from fewer than 50",
    ):
        fix_threshold(np.linspace(1.0, 2.0, 49), 98.0)
    assert fix_threshold(np.linspace(1.0, 2.0, 50), 98.0) > 1.9


def test_an_uncertain_threshold_is_called_so_with_its_range_and_the_rows_that_would_settle_it():
    comfortable = comfortable_holdout_rows(98.0)
    assert 500 < comfortable < 1500
    assert threshold_is_wide(comfortable - 1, 98.0) and not threshold_is_wide(comfortable, 98.0)
    few = threshold_uncertainty(np.random.default_rng(0).random(260), 98.0)
    warning = threshold_warning(few, 98.0)
    low, high = exceedance_range(260, 98.0)
    assert low < 0.01 and high > 0.04
    assert (
        "rests on 260 held-out normal rows" in warning
        and f"{low:.2%} and {high:.2%}" in warning
        and str(comfortable) in warning
    )
    assert threshold_warning(threshold_uncertainty(np.random.default_rng(0).random(5000), 98.0), 98.0) is None


def test_fix_threshold_refuses_non_finite_errors():
    errors = np.ones(1000)
    errors[5] = np.inf
    with pytest.raises(TrainingDataError, match="not all finite"):
        fix_threshold(errors, 98.0)


@pytest.mark.parametrize("bad", [0.0, 100.0, -1.0, 150.0, float("nan")])
def test_check_percentile_names_the_parameter(bad):
    with pytest.raises(ParameterError, match="percentile="):
        check_percentile(bad)


def test_calibration_stats_summarise_errors():
    stats = calibration_stats(np.arange(1, 101, dtype=float))
    assert stats["rows"] == 100 and stats["min"] == 1 and stats["max"] == 100
    assert stats["quantiles"]["50"] == pytest.approx(50.5)


def test_whitening_decorrelates_features_keeps_each_one_and_damps_exact_combinations():
    from models.autoencoder import standardisation, whitening_matrix
    from models.config import RECIPE_CANDIDATES

    # The fully whitening recipe; the default's floor of 1 decorrelates less and damps more.
    floor = RECIPE_CANDIDATES["default"]["whitened"]["whitening_floor"]

    rng = np.random.default_rng(4)
    base = rng.normal(size=(20_000, 3))
    moving_together = base[:, 0] + 0.75 * base[:, 1]
    features = np.column_stack([base[:, 0], moving_together, base[:, 2], np.full(len(base), 7.0)])
    mean, std = standardisation(features)
    standardised = (features - mean) / std
    whitened = standardised @ whitening_matrix(features, floor)
    before, after = (
        np.corrcoef(standardised[:, :2], rowvar=False)[0, 1],
        np.corrcoef(whitened[:, :2], rowvar=False)[0, 1],
    )
    assert before > 0.75 and abs(after) < before / 3, "features that move together are decorrelated"
    assert all(np.corrcoef(standardised[:, j], whitened[:, j])[0, 1] > 0.9 for j in range(3)), (
        "each output stays closest to its own feature"
    )
    assert np.all(whitened[:, 3] == 0.0), "a constant feature stays centred"

    with_combination = np.column_stack([features, 2.0 * features[:, 0] - features[:, 1]])
    matrix = whitening_matrix(with_combination, floor)
    assert np.isfinite(matrix).all() and np.abs(matrix).max() <= 1.0 / np.sqrt(floor), (
        "an exact combination is damped, not inverted"
    )
    mean, std = standardisation(with_combination)
    assert ((with_combination - mean) / std @ matrix).std(axis=0).max() <= 1.0



def test_exact_linear_dependencies_are_counted_and_decide_auto_decorrelation():
    from models.autoencoder import linear_dependencies

    rng = np.random.default_rng(3)
    base = rng.normal(size=(500, 5))
    derived = np.column_stack([base, base[:, 0] - base[:, 1], base.sum(axis=1), np.full(500, 7.0)])
    assert linear_dependencies(base) == 0
    # Two derived columns; the constant one is no dependency, only unused.
    assert linear_dependencies(derived) == 2
    config = resolve_preset("default")
    assert config.sized_for(rows=500, features=8, linear_dependencies=2).decorrelate_inputs is True
    assert config.sized_for(rows=500, features=21, linear_dependencies=1).decorrelate_inputs is False
    assert (
        resolve_preset("default", decorrelate_inputs=False)
        .sized_for(rows=500, features=8, linear_dependencies=2)
        .decorrelate_inputs
        is False
    )


def test_every_preset_name_the_flows_offer_has_a_recipe():
    assert set(PRESET_NAMES) == set(PRESETS)


def test_gaussian_like_features_are_whitened_and_real_looking_ones_are_not():
    from models.autoencoder import gaussian_like

    rng = np.random.default_rng(0)
    gaussian = rng.normal(size=(5_000, 6)) @ rng.normal(size=(6, 6))
    assert gaussian_like(gaussian)
    for awkward in (np.c_[gaussian, rng.exponential(size=5_000)], np.c_[gaussian, rng.integers(0, 2, 5_000)]):
        assert not gaussian_like(awkward)
    config = resolve_preset("default")
    assert config.sized_for(rows=5_000, features=6, gaussian_like=True).decorrelate_inputs is True
    assert config.sized_for(rows=5_000, features=6, gaussian_like=False).decorrelate_inputs is False
