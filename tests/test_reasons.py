"""Reasons in flagged rows: shares that decompose the score exactly, the planted feature found, tallies that add up."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.output_schema import reason_fields
from data.outputs import batch_outputs
from data.parquet import LabelRule
from models import bundle
from models.monitoring.reasons import ReasonTally, explain_rows
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from tests.conftest import FEATURES, RUN_DATE, SCORED_AT, current_bundle, make_rows, write_rows


def test_shares_decompose_each_flagged_rows_error_exactly(workspace_copy):
    _, loaded = current_bundle(workspace_copy)
    rows = make_rows(5000, seed=70, anomaly_share=0.05)
    matrix = np.column_stack([rows.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
    errors, residuals = loaded.scorer.with_flagged_residuals(matrix, loaded.threshold)
    flagged = errors > loaded.threshold
    assert len(residuals) == flagged.sum() > 0
    np.testing.assert_allclose(errors, loaded.scorer(matrix), rtol=1e-6)
    # The error is the mean of the squared residuals: each feature's term is its share of their sum.
    np.testing.assert_allclose(errors[flagged], np.mean(np.square(residuals.astype(np.float64)), axis=1), rtol=1e-5)
    reasons = explain_rows(residuals, "mse", FEATURES, 3)
    np.testing.assert_allclose(reasons.all_shares.sum(axis=1), 1.0)
    terms = reasons.all_shares * (errors[flagged] * len(FEATURES))[:, None]
    np.testing.assert_allclose(terms, np.square(residuals.astype(np.float64)), rtol=1e-4, atol=1e-9)
    assert (np.diff(reasons.shares, axis=1) <= 0).all(), "reasons are ordered by share"


def test_explain_rows_uses_absolute_residuals_for_mae_and_says_which_way():
    residuals = np.array([[0.5, -3.0, 1.0], [2.0, 0.0, -2.0]])
    reasons = explain_rows(residuals, "mae", ["a", "b", "c"], 2)
    assert reasons.features.tolist() == [["b", "c"], ["a", "c"]]
    np.testing.assert_allclose(reasons.shares, [[3.0 / 4.5, 1.0 / 4.5], [0.5, 0.5]])
    assert reasons.directions.tolist() == [["low", "high"], ["high", "low"]]


SENSORS = [f"s{j:02d}" for j in range(12)]


def _sensor_rows(n: int, seed: int) -> np.ndarray:
    """Twelve sensors that move together: three hidden factors mixed, plus a little noise of their own."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(3, len(SENSORS)))
    return rng.normal(size=(n, 3)) @ mixing + 0.1 * rng.normal(size=(n, len(SENSORS)))


@pytest.fixture(scope="module")
def sensor_workspace(tmp_path_factory):
    """A workspace with a model of the sensors, trained with the plain functions on normal rows only."""
    from models.config import resolve_preset
    from models.training import retraining
    from models.training.results import RecipeChoice, TrainedModel

    root = tmp_path_factory.mktemp("sensors")
    rows = _sensor_rows(8000, seed=1)
    table = pa.table(
        {
            "row_id": pa.array(np.arange(len(rows))),
            **{name: pa.array(rows[:, j]) for j, name in enumerate(SENSORS)},
            "label": pa.array(np.zeros(len(rows), dtype=np.int64)),
        }
    )
    write_rows(table, root / "training" / "train.parquet")
    config = resolve_preset(
        "default", epochs=30, batch_size=256, encoder_units=[24, 6], decoder_units=[24], early_stopping_patience=None
    )
    staging = bundle.staging_dir(root / "models", "20260102T000000Z")
    split = retraining.split_training_data(
        str(root / "training"), staging, LabelRule("label", "0", False), 0.2, 98.0, config.seed
    )
    history = retraining.train_model(split.train_path, split.feature_names, config, staging)
    errors = retraining.compute_holdout_errors(staging, split, history.config)
    threshold = retraining.fix_threshold_from_errors(errors, 98.0)
    recipe = RecipeChoice.preset("default", config)
    trained = TrainedModel(
        "20260102T000000Z", "default", LabelRule("label", "0"), split, recipe, history, threshold, errors
    )
    retraining.write_bundle(staging, trained)
    retraining.publish_version(staging)
    bundle.promote(root / "models", "20260102T000000Z")
    return root


def test_a_planted_offset_is_named_as_the_first_reason_with_its_direction(sensor_workspace):
    ws, loaded = current_bundle(sensor_workspace)
    rows = _sensor_rows(6000, seed=71)
    planted = np.arange(0, 6000, 5)
    which = planted % len(SENSORS)
    sign = np.where((planted // 5) % 2 == 0, 1.0, -1.0)
    # A large offset on one sensor, measured in that sensor's own spread.
    rows[planted, which] += 6.0 * sign * rows.std(axis=0)[which]
    table = pa.table(
        {"row_id": pa.array(np.arange(len(rows))), **{name: pa.array(rows[:, j]) for j, name in enumerate(SENSORS)}}
    )
    source = write_rows(table, sensor_workspace / "in" / "planted.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "planted")
    result = score_file(loaded, source, "planted", outputs, ScoringOptions(scored_at=SCORED_AT))

    flagged = pq.read_table(outputs.flagged).to_pandas().set_index("row_id")
    assert [c for c in flagged.columns if c.startswith("reason_")] == [name for name, _ in reason_fields(3)]
    expected = {row: (SENSORS[f], "high" if s > 0 else "low") for row, f, s in zip(planted, which, sign, strict=True)}
    right = [
        row in flagged.index and (flagged.loc[row, "reason_1"], flagged.loc[row, "reason_1_direction"]) == expected[row]
        for row in planted
    ]
    assert np.mean(right) >= 0.95, (
        "of all planted rows, at least 95% are flagged with the planted sensor and direction first"
    )
    assert (flagged["reason_1_share"] >= flagged["reason_2_share"]).all() and (
        flagged["reason_2_share"] >= flagged["reason_3_share"]
    ).all()
    assert ((flagged[["reason_1_share", "reason_2_share", "reason_3_share"]].sum(axis=1)) <= 1 + 1e-9).all()
    # The batch's tally counts every sensor about equally often as reason_1.
    tally = {row["feature"]: row for row in result.summary["reasons"]["table"]}
    assert result.summary["reasons"]["rows_flagged"] == len(flagged)
    assert all(tally[name]["reason_1_rows"] >= 0.8 * len(planted) / len(SENSORS) for name in SENSORS)


def test_no_reasons_are_written_when_none_are_asked_for(workspace_copy):
    ws, loaded = current_bundle(workspace_copy)
    source = write_rows(make_rows(2000, seed=72, anomaly_share=0.05), workspace_copy / "in" / "plain.parquet")
    outputs = batch_outputs(ws, RUN_DATE, "plain")
    result = score_file(loaded, source, "plain", outputs, ScoringOptions(scored_at=SCORED_AT, reason_count=0))
    assert not [c for c in pq.read_schema(outputs.flagged).names if c.startswith("reason_")]
    assert result.summary["reasons"]["rows_flagged"] == 0


def test_reason_tallies_add_up_and_refuse_other_features():
    residuals = np.random.default_rng(3).normal(size=(100, 3))
    whole, first, second = ReasonTally(["a", "b", "c"]), ReasonTally(["a", "b", "c"]), ReasonTally(["a", "b", "c"])
    whole.add(explain_rows(residuals, "mse", ["a", "b", "c"], 1))
    first.add(explain_rows(residuals[:40], "mse", ["a", "b", "c"], 1))
    second.add(explain_rows(residuals[40:], "mse", ["a", "b", "c"], 1))
    merged = ReasonTally.from_json(first.to_json()).merge(second)
    np.testing.assert_array_equal(merged.first, whole.first)
    np.testing.assert_array_equal(merged.share_units, whole.share_units)
    assert merged.rows == whole.rows == merged.first.sum() == 100
    with pytest.raises(ValueError, match="different features"):
        merged.merge(ReasonTally(["a", "b"]))
