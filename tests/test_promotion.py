from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.workspace import Workspace
from models import bundle
from models.training.promotion import check_promotion, cross_checked_flag_rates
from tests.conftest import FEATURES, make_rows


def _staging_with_errors(root, errors: np.ndarray, labelled: np.ndarray, holdout: pa.Table | None = None):
    staging = root / "models" / "20300101T000000Z.partial"
    (staging / "_work").mkdir(parents=True)
    path = staging / "_work" / "holdout-errors.parquet"
    pq.write_table(pa.table({"reconstruction_error": pa.array(errors), "labelled_anomaly": pa.array(labelled)}), path)
    if holdout is not None:
        pq.write_table(holdout, staging / "_work" / "holdout.parquet")
    return staging, str(path)


def _threshold(errors: np.ndarray) -> tuple[float, float]:
    """The threshold at the 98th percentile of ``errors``, and that percentile."""
    return float(np.percentile(errors, 98)), 98.0


def _holdout(staging) -> str:
    return str(staging / "_work" / "holdout.parquet")


def test_a_sound_model_passes_and_the_decision_is_saved(tmp_path):
    errors = np.random.default_rng(0).exponential(size=4000)
    staging, path = _staging_with_errors(tmp_path, errors, np.zeros(4000, dtype=bool))
    decision = check_promotion(staging, path, _holdout(staging), *_threshold(errors), tmp_path / "models", FEATURES)
    assert decision.passed and decision.reasons == []
    assert json.loads((staging / "promotion.json").read_text())["passed"] is True


def test_non_finite_errors_are_refused(tmp_path):
    errors = np.random.default_rng(0).exponential(size=4000)
    errors[7] = np.nan
    staging, path = _staging_with_errors(tmp_path, errors, np.zeros(4000, dtype=bool))
    decision = check_promotion(staging, path, _holdout(staging), 1.0, 98.0, tmp_path / "models", FEATURES)
    assert not decision.passed and "not finite" in decision.reasons[0]


def test_a_threshold_that_does_not_generalise_is_refused_while_another_model_is_current(workspace_copy):
    rng = np.random.default_rng(0)
    # The two halves of the held-out rows disagree: a threshold fixed on one flags far more than 2% of the other.
    errors = np.concatenate([rng.exponential(size=2000), 3 + rng.exponential(size=2000)])
    assert max(cross_checked_flag_rates(errors, 98.0)) > 0.3
    ws = Workspace.at(workspace_copy)
    staging, path = _staging_with_errors(workspace_copy, errors, np.zeros(4000, dtype=bool))
    decision = check_promotion(staging, path, _holdout(staging), *_threshold(errors), ws.models_dir, FEATURES)
    assert not decision.passed and "does not generalise" in decision.reasons[0]
    assert decision.first_model is False and decision.warnings == []


def test_a_first_model_failing_only_the_flag_rate_cross_check_is_promoted_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    errors = np.concatenate([rng.exponential(size=2000), 3 + rng.exponential(size=2000)])
    staging, path = _staging_with_errors(tmp_path, errors, np.zeros(4000, dtype=bool))
    decision = check_promotion(staging, path, _holdout(staging), *_threshold(errors), tmp_path / "models", FEATURES)
    # With no model current nothing could be scored: an unsure threshold is better than none.
    assert decision.passed and decision.first_model and decision.reasons == []
    [warning] = decision.warnings
    assert (
        warning.startswith("promoted although flag rate on unseen held-out normal rows was")
        and "no model was current" in warning
    )
    assert json.loads((staging / "promotion.json").read_text())["warnings"] == [warning]


def test_a_first_model_with_non_finite_errors_is_still_refused(tmp_path):
    errors = np.random.default_rng(0).exponential(size=4000)
    errors[7] = np.inf
    staging, path = _staging_with_errors(tmp_path, errors, np.zeros(4000, dtype=bool))
    decision = check_promotion(staging, path, _holdout(staging), 1.0, 98.0, tmp_path / "models", FEATURES)
    assert not decision.passed and decision.first_model and decision.warnings == []


def test_a_model_clearly_worse_than_the_current_one_on_labelled_anomalies_is_refused(workspace_copy):
    ws = Workspace.at(workspace_copy)
    current = bundle.load_bundle(ws.version_dir(bundle.current_version(ws.models_dir)))
    normal = make_rows(3000, seed=21)
    anomalies = make_rows(60, seed=22, anomaly_share=1.0)
    holdout = pa.concat_tables([normal, anomalies]).select(FEATURES)
    labelled = np.r_[np.zeros(3000, dtype=bool), np.ones(60, dtype=bool)]
    errors = np.random.default_rng(1).exponential(size=3060)
    errors[labelled] = 0.0  # the new model reconstructs every anomaly perfectly: recall 0
    staging, path = _staging_with_errors(
        workspace_copy, errors, labelled, holdout.append_column("labelled_anomaly", pa.array(labelled))
    )
    decision = check_promotion(
        staging, path, _holdout(staging), *_threshold(errors[~labelled]), ws.models_dir, FEATURES
    )
    assert decision.checks["current_version"] == current.version
    assert decision.checks["current_recall"] > 0.8
    assert not decision.passed and "clearly below the current model's" in decision.reasons[0]
    # The same errors with the anomalies well above the threshold pass.
    errors[labelled] = 100.0
    pq.write_table(pa.table({"reconstruction_error": pa.array(errors), "labelled_anomaly": pa.array(labelled)}), path)
    holdout, (threshold, percentile) = _holdout(staging), _threshold(errors[~labelled])
    assert check_promotion(staging, path, holdout, threshold, percentile, ws.models_dir, FEATURES).passed
