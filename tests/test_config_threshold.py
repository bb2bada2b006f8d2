from __future__ import annotations

import numpy as np
import pytest

from data.errors import ParameterError, TrainingDataError
from models.config import PRESETS, resolve_preset
from models.threshold import calibration_stats, check_percentile, fix_threshold, min_holdout_rows


def test_seed_preset_is_the_tutorial_recipe():
    seed = PRESETS["seed"]
    assert (seed.scale_inputs, seed.encoder_units, seed.decoder_units) == (False, [16, 8, 4], [8, 16])
    assert (seed.output_activation, seed.loss, seed.optimizer, seed.epochs, seed.batch_size) == ("sigmoid", "mae", "adam", 20, 64)


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


@pytest.mark.parametrize("errors", [np.zeros(1000), np.r_[np.zeros(990), np.ones(10)]])
def test_fix_threshold_refuses_a_zero_threshold(errors):
    with pytest.raises(TrainingDataError, match="98th percentile of held-out reconstruction errors is 0.0"):
        fix_threshold(errors, 98.0)


def test_fix_threshold_refuses_too_few_rows_with_the_number_needed():
    assert min_holdout_rows(98.0) == 500
    with pytest.raises(TrainingDataError, match="only 100 held-out normal rows; the 98th percentile needs at least 500"):
        fix_threshold(np.ones(100), 98.0)


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
