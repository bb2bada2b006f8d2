"""Missing feature values: filled in inside the model in training and at night, or quarantined when asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import TrainingDataError
from data.outputs import batch_outputs
from data.parquet import LabelRule, TrainingInput
from data.workspace import Workspace
from models import bundle
from models.config import resolve_preset
from models.monitoring.drift import measure_drift
from models.monitoring.error_summary import ErrorDistribution
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from models.training import retraining
from models.training.results import RecipeChoice, TrainedModel
from tests.conftest import FAST_OVERRIDES, FEATURES, RUN_DATE, SCORED_AT, make_rows, write_rows

pytestmark = pytest.mark.slow

VERSION = "20260301T000000Z"


def with_gaps(table: pa.Table, columns: list[str], share: float, seed: int) -> pa.Table:
    """Return ``table`` with ``share`` of the values of ``columns`` set to null."""
    rng = np.random.default_rng(seed)
    for name in columns:
        values = table.column(name).to_numpy()
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(values, mask=rng.random(len(values)) < share)
        )
    return table


@pytest.fixture(scope="module")
def filling_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose current model was trained on rows with gaps in f0 and f1, and fills them in."""
    root = tmp_path_factory.mktemp("filling-ws")
    write_rows(with_gaps(make_rows(8000, seed=1), ["f0", "f1"], 0.05, seed=2), root / "training" / "t.parquet")
    config = resolve_preset("default", **FAST_OVERRIDES)
    staging = bundle.staging_dir(root / "models", VERSION)
    split = retraining.split_training_data(
        str(root / "training"), staging, LabelRule("label", "0"), 0.2, 98.0, config.seed
    )
    fit = retraining.train_model(split.train_path, split.feature_names, config, staging)
    errors = retraining.compute_holdout_errors(staging, split, fit.config)
    threshold = retraining.fix_threshold_from_errors(errors, 98.0)
    recipe = RecipeChoice.preset("default", config)
    trained = TrainedModel(VERSION, "default", LabelRule("label", "0"), split, recipe, fit, threshold, errors)
    retraining.write_bundle(staging, trained)
    retraining.write_training_report(staging, trained)
    retraining.publish_version(staging)
    bundle.promote(root / "models", VERSION)
    return root


def test_rows_with_gaps_are_trained_on_and_the_bundle_says_how_many_values_were_filled(filling_workspace):
    ws = Workspace.at(filling_workspace)
    metadata = json.loads((ws.version_dir(VERSION) / "bundle.json").read_text())
    assert metadata["missing_values"] == "fill"
    filled = metadata["training"]["missing_values_filled"]
    assert set(filled) == {"f0", "f1"} and all(300 <= n <= 500 for n in filled.values())
    assert metadata["training"]["rows_total"] == 8000, "no row with a gap was left out"
    report = json.loads((ws.version_dir(VERSION) / "report" / "training-report.json").read_text())
    assert report["training"]["missing_counts"] == filled
    # The model loads in safe mode and holds the indicator of which features are missing.
    loaded = bundle.load_bundle(ws.version_dir(VERSION))
    assert loaded.fills_missing and "missing_indicator" in {layer.name for layer in loaded.model.layers}


def test_a_night_with_gaps_is_scored_row_for_row_and_ranks_as_the_complete_night(filling_workspace, tmp_path):
    from sklearn.metrics import roc_auc_score

    ws = Workspace.at(filling_workspace)
    loaded = bundle.load_bundle(ws.version_dir(VERSION))
    complete = make_rows(6000, seed=5, anomaly_share=0.05)
    gappy = with_gaps(complete, ["f0", "f1", "f3"], 0.05, seed=6)
    scored = {}
    for name, table in (("complete", complete), ("gappy", gappy)):
        source = write_rows(table, tmp_path / f"{name}.parquet")
        outputs = batch_outputs(ws, RUN_DATE, name)
        result = score_file(loaded, source, name, outputs, ScoringOptions(scored_at=SCORED_AT, reason_count=3))
        assert (result.rows_read, result.rows_scored, result.rows_quarantined) == (6000, 6000, 0)
        scored[name] = pq.read_table(outputs.scores).to_pandas().sort_values("row_id")
        flagged = pq.read_table(outputs.flagged).to_pandas()
        shares = flagged[[f"reason_{k}_share" for k in (1, 2, 3)]].sum(axis=1)
        assert (shares <= 1 + 1e-6).all() and (shares > 0).all()
        if name == "gappy":
            # f3 had no gaps in training: 5% of it missing at night is drift, and named so.
            drift = measure_drift(
                loaded.drift_reference,
                result.summary["feature_bins"],
                ErrorDistribution.from_json(result.summary["error_distribution"]),
            )
            f3 = next(row for row in drift["features"] if row["feature"] == "f3")
            assert f3["reference_missing_share"] == 0 and f3["night_missing_share"] == pytest.approx(0.05, abs=0.015)
            assert "f3" in drift["drifted_features"]
    labels = complete.column("label").to_numpy()
    aucs = {name: roc_auc_score(labels, frame["reconstruction_error"]) for name, frame in scored.items()}
    assert aucs["gappy"] >= aucs["complete"] - 0.03
    # f3 had no gaps in training: filled with its mean, without an indicator, its rows still get finite errors.
    assert np.isfinite(scored["gappy"]["reconstruction_error"]).all()


def test_infinite_values_are_still_refused_in_training(tmp_path):
    table = make_rows(500, seed=7)
    values = table.column("f2").to_numpy().copy()
    values[3] = np.inf
    source = write_rows(table.set_column(3, "f2", pa.array(values)), tmp_path / "t.parquet")
    with pytest.raises(TrainingDataError, match=r"t.parquet, column 'f2': 1 rows hold infinite values"):
        retraining.split_training_data(str(source), tmp_path / "staging", LabelRule("label", "0"), 0.2, 98.0, 0)


def test_quarantine_mode_refuses_training_rows_with_gaps_and_names_file_and_column(tmp_path):
    source = write_rows(with_gaps(make_rows(500, seed=8), ["f4"], 0.02, seed=9), tmp_path / "t.parquet")
    with pytest.raises(
        TrainingDataError, match=r"t.parquet, column 'f4': \d+ rows hold NaN, null or infinite values"
    ):
        retraining.split_training_data(
            str(source), tmp_path / "staging", LabelRule("label", "0"), 0.2, 98.0, 0, TrainingInput("quarantine")
        )


def test_a_recipe_that_does_not_scale_its_inputs_refuses_gaps_with_a_way_out(tmp_path):
    source = write_rows(with_gaps(make_rows(2000, seed=10), ["f0"], 0.05, seed=11), tmp_path / "t.parquet")
    config = resolve_preset("seed", epochs=1)
    staging = tmp_path / "staging"
    split = retraining.split_training_data(str(source), staging, LabelRule("label", "0"), 0.2, 98.0, 0)
    with pytest.raises(TrainingDataError, match="cannot fill them in; use the default preset"):
        retraining.train_model(split.train_path, split.feature_names, config, staging)


def test_a_model_trained_to_quarantine_gaps_quarantines_them_at_night(workspace_copy):
    from tests.conftest import current_bundle

    ws, loaded = current_bundle(workspace_copy)
    assert not loaded.fills_missing
    source = write_rows(with_gaps(make_rows(1000, seed=12), [FEATURES[0]], 0.01, seed=13), workspace_copy / "n.parquet")
    result = score_file(loaded, source, "n", batch_outputs(ws, RUN_DATE, "n"), ScoringOptions(scored_at=SCORED_AT))
    assert result.rows_quarantined > 0 and result.rows_scored + result.rows_quarantined == 1000
