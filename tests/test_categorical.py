"""Text columns become categorical features: one-hot encoded inside the model, named in reasons, checked at night."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from bench.categorical import CURRENCY_OF, transactions
from data.errors import SchemaError
from data.parquet import check_batch_schema, read_training_rows
from data.workspace import Workspace
from tests.conftest import RUN_DATE, current_bundle, write_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def categorical_workspace(harness, tmp_path_factory):
    """A workspace retrained on transactions whose text columns are categorical features."""
    from flows.retrain import retrain_flow

    root = tmp_path_factory.mktemp("categorical")
    write_rows(transactions(8_000, seed=1), Workspace.at(root).training_dir / "train.parquet")
    outcome = retrain_flow(workspace=str(root), all_rows_normal=True, epochs=40, seed=3)
    return root, outcome


def test_text_columns_become_features_with_their_vocabulary_in_the_bundle(categorical_workspace):
    root, outcome = categorical_workspace
    _, bundle = current_bundle(root)  # loaded in Keras' safe mode
    features = {f["name"]: f for f in bundle.metadata["features"]}
    assert features["country"] == {
        "name": "country",
        "dtype": "string",
        "kind": "categorical",
        "vocabulary": sorted(CURRENCY_OF),
    }
    assert features["currency"]["vocabulary"] == sorted(set(CURRENCY_OF.values()))
    assert {features[n]["kind"] for n in ("amount", "items", "hour")} == {"numeric"}
    # An id-like text column is never one-hot encoded, and the JSON line says why it is left out.
    assert outcome["ignored_columns"]["txn_id"].startswith("identifier")
    assert "txn_id" not in features


def test_a_categorical_feature_widens_the_network_by_the_bits_its_slots_need_not_by_its_slots(categorical_workspace):
    from models.autoencoder import encoded_width, sizing_width

    columns = [(4, 8), (5, 6), (6, 51), (7, 2)]
    assert encoded_width(8, columns) == 4 + 8 + 6 + 51 + 2
    assert sizing_width(8, columns) == 4 + 3 + 3 + 6 + 1
    root, _ = categorical_workspace
    _, loaded = current_bundle(root)
    config = loaded.metadata["config"]
    sized = sizing_width(len(loaded.feature_names), config["categorical_columns"])
    assert (
        config["encoder_units"][0]
        == 2 * sized
        < 2 * encoded_width(len(loaded.feature_names), config["categorical_columns"])
    )


def test_a_night_that_breaks_the_tie_is_flagged_with_the_tied_columns_as_reasons(categorical_workspace):
    from flows.score import score_flow

    root, _ = categorical_workspace
    ws = Workspace.at(root)
    night = transactions(4_000, seed=2, anomaly_share=0.03, start_id=100_000)
    currency = night.column("currency").to_pylist()
    country = night.column("country").to_pylist()
    currency[:5] = ["SEK"] * 5  # never seen in training
    country[5:10] = [None] * 5  # missing
    night = night.set_column(night.schema.get_field_index("currency"), "currency", pa.array(currency))
    night = night.set_column(night.schema.get_field_index("country"), "country", pa.array(country))
    write_rows(night, ws.incoming_for(RUN_DATE) / "night.parquet")

    outcome = score_flow(workspace=str(root), run_date=RUN_DATE)
    assert outcome["rows_scored"] == 4_000 and outcome["rows_quarantined"] == 0
    scores = pq.read_table(ws.output_partition("scores", RUN_DATE) / "night.parquet").to_pandas()
    labels = night.column("label").to_numpy()
    assert roc_auc_score(labels[10:], scores["reconstruction_error"].to_numpy()[10:]) >= 0.95
    flagged = pq.read_table(ws.output_partition("flagged", RUN_DATE) / "night.parquet").to_pandas()
    planted = flagged[flagged["label"] == 1]
    assert len(planted) >= 0.8 * labels.sum()
    assert planted["reason_1"].isin(["currency", "country"]).mean() >= 0.8
    assert set(planted.loc[planted["reason_1"].isin(["currency", "country"]), "reason_1_direction"]) == {"unusual"}
    shares = flagged[[c for c in flagged.columns if c.startswith("reason_") and c.endswith("_share")]].sum(axis=1)
    assert np.all(shares <= 1.0 + 1e-9) and np.all(shares > 0)
    report = json.loads((ws.output_partition("reports", RUN_DATE) / "batches" / "night.json").read_text())
    assert report["unseen_categories"] == {"country": 0, "currency": 5}


def test_a_categorical_feature_arriving_as_numbers_is_refused_naming_file_and_column(tmp_path):
    table = transactions(50, seed=4)
    path = write_rows(
        table.set_column(table.schema.get_field_index("currency"), "currency", pa.array(np.ones(50))),
        tmp_path / "night.parquet",
    )
    with pytest.raises(SchemaError, match="expected text") as refused:
        check_batch_schema(path, ["amount", "currency"], categorical={"currency": ["EUR"]})
    assert refused.value.column == "currency" and str(path) in str(refused.value)


def test_text_columns_with_too_many_values_are_left_out_with_why(tmp_path):
    table = transactions(500, seed=5)
    table = table.append_column("merchant", pa.array([f"m{i % 80}" for i in range(500)]))
    rows = read_training_rows(write_rows(table, tmp_path / "t.parquet"), "label", "0", max_categories=50)
    assert rows.feature_names == ["amount", "items", "hour", "basket_share", "country", "currency"]
    assert rows.ignored_columns["merchant"] == "too many distinct values: more than max_categories=50"
    assert rows.ignored_columns["txn_id"] == "identifier: a distinct value on every row"
    assert rows.kinds["country"] == rows.kinds["currency"] == "categorical"
    codes = rows.features[:, rows.feature_names.index("country")]
    assert set(np.unique(codes)) <= set(range(len(CURRENCY_OF)))


def test_a_categorical_features_share_is_the_sum_over_its_slots_and_shares_still_add_up(categorical_workspace):
    from data.parquet import feature_matrix
    from models.autoencoder import encoded_width, target_layers
    from models.monitoring.reasons import explain_rows

    root, _ = categorical_workspace
    _, loaded = current_bundle(root)
    night = transactions(3_000, seed=6, anomaly_share=0.05)
    matrix = feature_matrix(night, loaded.feature_names, vocabularies=loaded.vocabularies)
    errors, residuals = loaded.scorer.with_flagged_residuals(matrix, loaded.threshold)
    flagged = errors > loaded.threshold
    assert residuals.shape == (flagged.sum(), len(loaded.feature_names)) and flagged.sum() > 0
    categorical = loaded.metadata["config"]["categorical_columns"]
    width = encoded_width(len(loaded.feature_names), categorical)
    # One residual per column the user has; their squares add up to the error over every encoded value.
    np.testing.assert_allclose(errors[flagged], np.square(residuals.astype(np.float64)).sum(axis=1) / width, rtol=1e-5)
    shares = explain_rows(residuals, "mse", loaded.feature_names, 3, loaded.vocabularies).all_shares
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    # What the model reproduces holds each category's slots one-hot.
    target = matrix[:4]
    for layer in target_layers(loaded.model)[:1]:
        target = np.asarray(layer(target))
    assert target.shape == (4, width)


def test_a_night_whose_currencies_are_often_unseen_drifts_on_that_column(categorical_workspace):
    import datetime as dt

    from flows.score import score_flow

    root, _ = categorical_workspace
    ws = Workspace.at(root)
    day = RUN_DATE + dt.timedelta(days=1)
    night = transactions(4_000, seed=7, start_id=200_000)
    currency = night.column("currency").to_pylist()
    for i in range(0, len(currency), 3):
        currency[i] = "SEK"  # a third of the night pays in a currency training never saw
    night = night.set_column(night.schema.get_field_index("currency"), "currency", pa.array(currency))
    write_rows(night, ws.incoming_for(day) / "night.parquet")

    score_flow(workspace=str(root), run_date=day, catch_up_days=0)
    report = json.loads((ws.output_partition("reports", day) / "run-report.json").read_text())
    drifted = {row["feature"] for row in report["drift"]["features"] if row["drifted"]}
    assert "currency" in drifted
    assert "country" not in drifted
    assert "input_drift:currency" in report["alarm_reasons"]
    assert report["unseen_categories"]["currency"] == len(range(0, 4_000, 3))
