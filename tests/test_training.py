"""Retraining's plain functions on data that real tables bring.

Awkward features, divergence, small sets, recipe choice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.parquet import LabelRule
from models.config import RECIPE_CANDIDATES, resolve_preset
from models.training import retraining
from models.training.results import TrainedModel
from tests.conftest import REPO_ROOT, write_rows

pytestmark = pytest.mark.slow

AWKWARD = ["a", "b", "c", "d", "combined", "rare_flag", "count"]


def _awkward_rows(n: int, seed: int) -> np.ndarray:
    """Four Gaussian features, an exact linear combination of two, a rare flag and a small integer count.

    The flag is set on 0.2% of rows.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    combined = base[:, 0] + 2.0 * base[:, 1]
    rare_flag = (rng.random(n) < 0.002).astype(np.float64)
    count = rng.poisson(2.0, size=n).astype(np.float64)
    return np.column_stack([base, combined, rare_flag, count])


def _table(rows: np.ndarray, labels: np.ndarray | None = None) -> pa.Table:
    columns = {name: pa.array(rows[:, j]) for j, name in enumerate(AWKWARD)}
    if labels is not None:
        columns["label"] = pa.array(labels)
    return pa.table(columns)


def _retrain(source: Path, staging: Path, config, all_rows_normal: bool = True, preset: str = "default"):
    split = retraining.split_training_data(
        str(source), staging, LabelRule("label", "0", all_rows_normal), 0.2, 98.0, config.seed
    )
    recipe = retraining.choose_recipe(split, preset, config, staging)
    history = retraining.train_model(split.train_path, split.feature_names, recipe.config, staging)
    errors = retraining.compute_holdout_errors(
        staging, split, history.config, normal_errors_path=recipe.normal_errors_path
    )
    threshold = retraining.fix_threshold_from_errors(errors, 98.0, split.scheme)
    return split, recipe, history, threshold


def test_a_near_constant_feature_and_an_exact_linear_dependency_train_and_rank(tmp_path):
    from models.autoencoder import reconstruction_errors
    from models.runtime import keras

    source = write_rows(_table(_awkward_rows(6000, seed=1)), tmp_path / "train.parquet")
    split, _, history, threshold = _retrain(source, tmp_path / "staging", resolve_preset("default", epochs=30))
    assert history.diverged_attempts == [] and np.isfinite(threshold.value) and threshold.value > 0
    model = keras.saving.load_model(tmp_path / "staging" / "model.keras", compile=False, safe_mode=True)

    fresh = _awkward_rows(20_000, seed=2)
    errors = reconstruction_errors(model, fresh, "mse")
    # About 2% of unseen normal rows are flagged: the rare flag and the dependency do not swamp the threshold.
    assert 0.01 <= np.mean(errors > threshold.value) <= 0.04
    # Anomalies that break the dependency, or carry a far outlier, rank above normal rows.
    broken = _awkward_rows(400, seed=3)
    broken[:200, 4] += 3.0
    broken[200:, 6] = 1e6
    from sklearn.metrics import roc_auc_score

    broken_errors = reconstruction_errors(model, broken, "mse")
    assert np.isfinite(broken_errors).all(), "a value of a million standard deviations still gives a finite error"
    normal = np.zeros(len(errors))

    def ranking(anomaly_errors: np.ndarray) -> float:
        return roc_auc_score(np.r_[normal, np.ones(len(anomaly_errors))], np.r_[errors, anomaly_errors])

    assert ranking(broken_errors[200:]) > 0.99
    # One feature in seven is an exact combination of others, so the default whitens its inputs: an offset of
    # 1.3 of `combined`'s standard deviations, ordinary on its own, breaks the relation and stands out.
    assert history.config.decorrelate_inputs is True
    assert ranking(broken_errors[:200]) > 0.95


def test_without_exact_dependencies_the_default_keeps_standardised_inputs(tmp_path):
    rows = _awkward_rows(600, seed=11)
    source = write_rows(_table(rows).drop_columns(["combined"]), tmp_path / "train.parquet")
    _, _, history, _ = _retrain(source, tmp_path / "staging", resolve_preset("default", epochs=3))
    assert history.config.decorrelate_inputs is False


def test_a_diverged_fit_is_trained_again_with_a_smaller_learning_rate_and_clipped_gradients():
    rng = np.random.default_rng(0)
    # Unscaled values in the hundreds and plain SGD at 0.5: the first fit's loss becomes NaN at once.
    features = rng.normal(size=(2000, 6)) * 100.0
    config = resolve_preset(
        "default", scale_inputs=False, optimizer="sgd", learning_rate=0.5, epochs=10, ensemble_size=1, input_dropout=0.0
    )
    model, history, trained, diverged = retraining.fit_autoencoder(features, config.sized_for(rows=2000, features=6))
    assert [d["learning_rate"] for d in diverged] == [0.5] and "nan" in diverged[0]["problem"]
    assert (trained.learning_rate, trained.gradient_clip_norm) == (pytest.approx(0.05), 1.0)
    assert np.isfinite(history.loss).all() and history.loss[-1] < history.loss[0]


def test_a_set_of_120_normal_rows_fixes_its_threshold_on_every_row_out_of_fold(tmp_path):
    rows = np.random.default_rng(4).normal(size=(120, 5))
    source = write_rows(pa.table({f"x{j}": pa.array(rows[:, j]) for j in range(5)}), tmp_path / "small.parquet")
    split, _, history, threshold = _retrain(source, tmp_path / "staging", resolve_preset("default", epochs=20))
    assert (split.scheme, split.folds, split.rows_train, split.rows_threshold) == ("cross_fit", 5, 120, 120)
    assert threshold.rows == 120 and history.config.ensemble_size == 3
    low, high = threshold.uncertainty["confidence_interval"]
    assert low <= threshold.value <= high
    assert threshold.warning.startswith(
        "the threshold rests on 120 normal rows scored out of fold: "
        "normal rows will exceed it at a rate anywhere between"
    )
    errors = pq.read_table(tmp_path / "staging" / "_work" / "holdout-errors.parquet")
    assert errors.num_rows == 120 and not errors.column("labelled_anomaly").to_numpy(zero_copy_only=False).any()


def test_fewer_normal_rows_than_the_percentile_needs_are_refused_with_the_number_needed(tmp_path):
    from data.errors import TrainingDataError

    rows = np.random.default_rng(5).normal(size=(49, 3))
    source = write_rows(pa.table({f"x{j}": pa.array(rows[:, j]) for j in range(3)}), tmp_path / "tiny.parquet")
    with pytest.raises(
        TrainingDataError,
        match="49 normal rows; the 98th percentile cannot be estimated from fewer than 50 normal rows",
    ):
        retraining.split_training_data(str(source), tmp_path / "staging", LabelRule("label", "0", True), 0.2, 98.0, 0)


def test_labelled_anomalies_choose_the_recipe_that_ranks_them_best(tmp_path):
    rng = np.random.default_rng(6)
    normal = _awkward_rows(1500, seed=7)
    anomalies = _awkward_rows(40, seed=8)
    anomalies[:, 4] += rng.choice([-3.0, 3.0], size=40)
    rows = np.vstack([normal, anomalies])
    labels = np.r_[np.zeros(len(normal), dtype=np.int64), np.ones(len(anomalies), dtype=np.int64)]
    source = write_rows(_table(rows, labels), tmp_path / "labelled.parquet")
    split, recipe, history, _ = _retrain(
        source, tmp_path / "staging", resolve_preset("default", epochs=15), all_rows_normal=False
    )
    names = [row["recipe"] for row in recipe.candidates]
    assert names == list(RECIPE_CANDIDATES["default"]) and sum(row["chosen"] for row in recipe.candidates) == 1
    best = max(recipe.candidates, key=lambda row: row["roc_auc"])
    assert recipe.name == best["recipe"] and best["chosen"]
    assert recipe.chosen_on == "ROC-AUC of 40 labelled anomalies against the normal rows out of fold"
    # The chosen recipe's settings are what was trained, and its out-of-fold errors fixed the threshold.
    changes = RECIPE_CANDIDATES["default"][recipe.name]
    assert all(getattr(history.config, key) == value for key, value in changes.items())
    errors_path = str(tmp_path / "staging" / "_work" / "holdout-errors.parquet")
    threshold = retraining.fix_threshold_from_errors(errors_path, 98.0, split.scheme)
    trained = TrainedModel(
        "20300101T000000Z", "default", LabelRule("label", "0"), split, recipe, history, threshold, errors_path
    )
    report = retraining.write_training_report(tmp_path / "staging", trained)
    assert f"Recipe chosen on the {recipe.chosen_on}" in report.markdown
    assert report.report["recipe"]["name"] == recipe.name
    assert report.report["training"]["ignored_columns"] == {"label": "label"}
    assert "| columns that are not features | label (label) |" in report.markdown


def test_without_labelled_anomalies_the_preset_recipe_is_kept_and_says_why(tmp_path):
    source = write_rows(_table(_awkward_rows(300, seed=9)), tmp_path / "normal.parquet")
    split = retraining.split_training_data(
        str(source), tmp_path / "staging", LabelRule("label", "0", True), 0.2, 98.0, 0
    )
    recipe = retraining.choose_recipe(split, "default", resolve_preset("default"), tmp_path / "staging")
    assert recipe.name == "default" and recipe.candidates == [] and recipe.normal_errors_path is None
    assert recipe.note == "0 labelled anomalies held out; at least 5 choose among candidate recipes"


def test_the_same_data_and_seed_give_the_same_threshold_in_two_processes(tmp_path):
    source = write_rows(_table(_awkward_rows(1000, seed=10)), tmp_path / "train.parquet")
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from models.training import retraining\n"
        "from data.parquet import LabelRule\n"
        "from models.config import resolve_preset\n"
        "source, staging = sys.argv[1], Path(sys.argv[2])\n"
        "config = resolve_preset('default', epochs=10)\n"
        "split = retraining.split_training_data(source, staging, LabelRule('label', '0', True), "
        "0.2, 98.0, config.seed)\n"
        "history = retraining.train_model(split.train_path, split.feature_names, config, staging)\n"
        "errors = retraining.compute_holdout_errors(staging, split, history.config)\n"
        "print(json.dumps(retraining.fix_threshold_from_errors(errors, 98.0, split.scheme).value))\n"
    )
    values = []
    for run in range(2):
        done = subprocess.run(
            [sys.executable, "-c", code, str(source), str(tmp_path / f"staging-{run}")],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        values.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert values[0] == values[1]


def test_another_thread_drawing_from_pythons_random_does_not_change_the_initial_weights(monkeypatch):
    import random

    from models import autoencoder
    from models.runtime import keras

    features = _awkward_rows(2000, seed=12)
    config = retraining.sized_for_data(resolve_preset("default", epochs=1), features)
    undisturbed = autoencoder.build_autoencoder(config, features).get_weights()
    seed = keras.utils.set_random_seed

    def seed_then_another_thread_draws(value):
        seed(value)
        random.random()  # what a thread of Prefect's (retry jitter, ids) may do at any moment

    monkeypatch.setattr(keras.utils, "set_random_seed", seed_then_another_thread_draws)
    disturbed = autoencoder.build_autoencoder(config, features).get_weights()
    assert len(disturbed) == len(undisturbed)
    assert all(np.array_equal(a, b) for a, b in zip(disturbed, undisturbed, strict=True))


def test_a_small_set_trains_every_epoch_on_all_its_rows_in_few_keras_epochs():
    from models.autoencoder import build_autoencoder, passes_per_epoch, train_autoencoder

    assert passes_per_epoch(rows=123, epochs=200) == 25 and passes_per_epoch(rows=5_000, epochs=200) == 1
    assert passes_per_epoch(rows=123, epochs=7) == 7 and passes_per_epoch(rows=1_000, epochs=6) == 3
    rows = np.random.default_rng(0).normal(size=(300, 5))
    config = resolve_preset("default", epochs=40).sized_for(rows=len(rows), features=5)
    seen = []
    history = train_autoencoder(build_autoencoder(config, rows), rows, config, lambda epoch, logs: seen.append(epoch))
    # 300 rows fill a 4,096-row Keras epoch 14 times; 10 divides the 40 epochs. No row is held out for validation.
    assert history.epochs_run == 40 and len(history.loss) == 4 and history.val_loss == [] and not history.stopped_early
    assert seen == [9, 19, 29, 39]
