"""Labels that arrive later, joined to what was scored: every figure checked against scikit-learn on the joined rows."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from data.errors import SchemaError
from data.labels import labels_dir, stage_labels
from data.outputs import batch_outputs
from data.parquet import LabelRule
from models.evaluation.labelled import RECALL_UNKNOWN, evaluate_dates
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from tests.conftest import SCORED_AT, current_bundle, make_rows, write_rows

NIGHTS = [dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)]


def _label_file(ws, name: str, table: pd.DataFrame, mtime: float) -> Path:
    path = write_rows(pa.Table.from_pandas(table, preserve_index=False), labels_dir(ws) / name)
    os.utime(path, (mtime, mtime))
    return path


def _evaluate(ws) -> dict[dt.date, dict]:
    staged = ws.state_dir / "labels" / "staged.parquet"
    stage_labels(ws, ["row_id"], "label", "0", staged)
    evaluate_dates(str(ws.root), NIGHTS, ["row_id"], str(staged))
    out = {}
    for night in NIGHTS:
        [row] = pq.read_table(ws.output_partition("evaluation", night) / "evaluation.parquet").to_pylist()
        assert json.loads((ws.output_partition("evaluation", night) / "_evaluation.json").read_text())[
            "by_model_version"
        ] == [row]
        out[night] = row
    return out


def _expected(scores: pd.DataFrame, labels: pd.DataFrame) -> dict:
    joined = scores.merge(labels, on="row_id", how="inner")
    truth, flagged = joined["truth"].to_numpy() == 1, joined["is_anomaly"].to_numpy()
    return {
        "rows_labelled": len(joined),
        "precision": precision_score(truth, flagged, zero_division=0),
        "recall": recall_score(truth, flagged),
        "f1": f1_score(truth, flagged),
        "roc_auc": roc_auc_score(truth, joined["reconstruction_error"]),
        "pr_auc": average_precision_score(truth, joined["reconstruction_error"]),
    }


@pytest.mark.slow
def test_later_labels_give_the_realised_quality_of_each_night_and_more_labels_replace_it(workspace_copy: Path) -> None:
    ws, loaded = current_bundle(workspace_copy)
    truth, scores = {}, {}
    for i, night in enumerate(NIGHTS):
        # The batch carries no label column: labels only arrive later.
        table = make_rows(3000, seed=40 + i, anomaly_share=0.05, start_id=10_000 * i)
        truth[night] = table.select(["row_id", "label"]).to_pandas().rename(columns={"label": "truth"})
        source = write_rows(table.drop_columns(["label"]), ws.incoming_for(night) / "batch.parquet")
        score_file(loaded, source, "batch", batch_outputs(ws, night, "batch"), ScoringOptions(scored_at=SCORED_AT))
        scores[night] = pd.read_parquet(ws.output_partition("scores", night))
    first, second, third = NIGHTS
    flagged_second = truth[second][
        truth[second]["row_id"].isin(scores[second].loc[scores[second]["is_anomaly"], "row_id"])
    ]

    # Night 1 fully labelled, in two files: a first pass marks every row normal, a later review (newer
    # labelled_at, older file) corrects the anomalies, so the latest labelled_at must win over the file order.
    review_time = pd.Timestamp("2026-11-25T10:00:00Z")
    wrong = truth[first].assign(label=0, labelled_at=pd.Timestamp("2026-11-23T10:00:00Z"))[
        ["row_id", "label", "labelled_at"]
    ]
    review = (
        truth[first]
        .loc[truth[first]["truth"] == 1]
        .assign(label=1, labelled_at=review_time)[["row_id", "label", "labelled_at"]]
    )
    _label_file(ws, "a-review.parquet", review, mtime=1_000)
    _label_file(ws, "b-first-pass.parquet", wrong, mtime=2_000)
    # Night 2: only the flagged rows are labelled (as a reviewer confirms alerts). Night 3: no labels.
    _label_file(ws, "c-alerts.parquet", flagged_second.rename(columns={"truth": "label"}), mtime=3_000)

    result = _evaluate(ws)
    expected = _expected(scores[first], truth[first])
    got = result[first]
    assert got["rows_scored"] == 3000 and got["rows_flagged"] == int(scores[first]["is_anomaly"].sum())
    assert got["label_coverage_flagged"] == 1.0 and got["label_coverage_unflagged"] == 1.0 and got["recall_known"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["recall"] > 0.5  # the review's anomalies, not the first pass's "normal", were used

    got = result[second]
    assert got["rows_labelled"] == len(flagged_second) and got["label_coverage_unflagged"] == 0.0
    assert got["precision"] == pytest.approx(
        precision_score(flagged_second["truth"] == 1, np.ones(len(flagged_second), bool))
    )
    assert (got["recall"], got["f1"], got["roc_auc"], got["pr_auc"], got["recall_known"]) == (
        None,
        None,
        None,
        None,
        False,
    )
    assert RECALL_UNKNOWN in got["note"]
    assert (
        result[third]["rows_labelled"] == 0
        and result[third]["precision"] is None
        and "no labels yet" in result[third]["note"]
    )

    # The rest of night 2 is labelled later: evaluating again replaces its figures.
    _label_file(ws, "d-rest.parquet", truth[second].rename(columns={"truth": "label"}), mtime=4_000)
    again = _evaluate(ws)[second]
    for key, value in _expected(scores[second], truth[second]).items():
        assert again[key] == pytest.approx(value, abs=1e-12), key
    assert len(pq.read_table(ws.output_partition("evaluation", second))) == 1
    # The whole evaluation history reads as one Hive-partitioned dataset, one row per date and model.
    history = pd.read_parquet(ws.outputs_dir / "evaluation")
    assert len(history) == 3 and sorted(history["date"].astype(str)) == sorted(history["scored_date"]) == [
        n.isoformat() for n in NIGHTS
    ]


def test_a_label_file_without_its_label_column_is_refused_naming_file_and_column(tmp_path: Path) -> None:
    from data.workspace import Workspace

    ws = Workspace.at(tmp_path)
    good = _label_file(ws, "good.parquet", pd.DataFrame({"row_id": [1, 2], "label": [0, 1]}), mtime=1_000)
    bad = _label_file(ws, "bad.parquet", pd.DataFrame({"row_id": [3], "verdict": [1]}), mtime=2_000)
    target = tmp_path / "state" / "staged.parquet"
    with pytest.raises(SchemaError) as caught:
        stage_labels(ws, ["row_id"], "label", "0", target)
    assert caught.value.column == "label" and str(bad) in str(caught.value)
    assert not target.exists(), "nothing half-applied"
    assert good.exists()


def test_retraining_data_gains_the_rows_labels_confirm_normal_and_holds_out_those_confirmed_anomalous(
    tmp_path: Path,
) -> None:
    from data.workspace import Workspace
    from models.training.label_history import label_history_for_training
    from models.training.retraining import split_training_data

    ws = Workspace.at(tmp_path / "ws")
    write_rows(make_rows(2000, seed=1, anomaly_share=0.02), ws.training_dir / "train.parquet")
    today = dt.date(2026, 11, 29)
    nights = {today - dt.timedelta(days=1): 0, today - dt.timedelta(days=2): 1, today - dt.timedelta(days=40): 2}
    labels = []
    for night, i in nights.items():
        table = make_rows(500, seed=60 + i, anomaly_share=0.1, start_id=100_000 * (i + 1))
        write_rows(table.drop_columns(["label"]), ws.incoming_for(night) / "batch.parquet")
        labels.append(table.select(["row_id", "label"]).to_pandas())
    # Yesterday is fully labelled, the day before only its first 100 rows; the night 40 days ago is outside the window.
    _label_file(ws, "labels.parquet", pd.concat([labels[0], labels[1].iloc[:100], labels[2]]), mtime=1_000)

    history = label_history_for_training(
        str(ws.root), str(ws.training_dir), LabelRule("label", "0"), today, 30, ["row_id"], tmp_path / "work"
    )
    expected = pd.concat([labels[0], labels[1].iloc[:100]])
    assert history.rows_confirmed_normal == int((expected["label"] == 0).sum())
    assert history.rows_confirmed_anomalous == int((expected["label"] == 1).sum())
    assert [n["date"] for n in history.by_night] == sorted(n.isoformat() for n in list(nights)[:2])

    plain = split_training_data(str(ws.training_dir), tmp_path / "plain", LabelRule("label", "0", False), 0.2, 98.0, 1)
    split = split_training_data(
        str(ws.training_dir),
        tmp_path / "staged",
        LabelRule("label", "0", False),
        0.2,
        98.0,
        1,
        label_history=history.path,
    )
    assert (
        split.rows_train + split.rows_holdout_normal
        == plain.rows_train + plain.rows_holdout_normal + history.rows_confirmed_normal
    )
    assert split.rows_holdout_anomalies == plain.rows_holdout_anomalies + history.rows_confirmed_anomalous
    assert (split.rows_label_history_normal, split.rows_label_history_anomalies) == (
        history.rows_confirmed_normal,
        history.rows_confirmed_anomalous,
    )
    # No row a label calls anomalous is trained on.
    confirmed_anomalous = pq.read_table(history.path).to_pandas().query("label != '0'")["f0"]
    assert not set(pq.read_table(split.train_path).column("f0").to_pylist()) & set(confirmed_anomalous)


def test_label_history_keeps_categorical_features_as_text_and_rows_with_gaps_only_where_they_are_filled(
    tmp_path: Path,
) -> None:
    from data.workspace import Workspace
    from models.training.label_history import label_history_for_training
    from models.training.retraining import split_training_data

    def with_channel(table: pa.Table, seed: int) -> pa.Table:
        channels = np.random.default_rng(seed).choice(["app", "shop", "web"], size=table.num_rows)
        return table.append_column("channel", pa.array(channels.tolist()))

    ws = Workspace.at(tmp_path / "ws")
    write_rows(with_channel(make_rows(1500, seed=1), seed=1), ws.training_dir / "train.parquet")
    today = dt.date(2026, 11, 29)
    night = with_channel(make_rows(400, seed=61, anomaly_share=0.1, start_id=100_000), seed=2).to_pandas()
    night.loc[0:9, "f0"] = np.nan  # ten gaps in a numeric feature
    night.loc[10:14, "channel"] = None  # five in the categorical one
    night.loc[15:16, "f1"] = np.inf  # bad input, left out either way
    write_rows(
        pa.Table.from_pandas(night.drop(columns="label"), preserve_index=False), ws.incoming_for(today) / "b.parquet"
    )
    _label_file(ws, "labels.parquet", night[["row_id", "label"]], mtime=1_000)

    counts, gathered_at = {}, {}
    for mode in ("fill", "quarantine"):
        history = label_history_for_training(
            str(ws.root), str(ws.training_dir), LabelRule("label", "0"), today, 3, ["row_id"], tmp_path / mode, mode
        )
        counts[mode] = history.rows_confirmed_normal + history.rows_confirmed_anomalous
        gathered_at[mode] = history.path
        gathered = pq.read_table(history.path)
        assert pa.types.is_string(gathered.schema.field("channel").type), "a categorical feature stays text"
        assert not np.isinf(gathered.column("f1").to_numpy(zero_copy_only=False)).any()
    assert counts == {"fill": 400 - 2, "quarantine": 400 - 2 - 15}

    split = split_training_data(
        str(ws.training_dir),
        tmp_path / "staged",
        LabelRule("label", "0", False),
        0.2,
        98.0,
        1,
        label_history=gathered_at["fill"],
    )
    assert split.kinds["channel"] == "categorical" and split.vocabularies["channel"] == ["app", "shop", "web"]
    assert split.rows_label_history_normal + split.rows_label_history_anomalies == 398
    # The history's gaps are counted as filled values, as the training data's would be.
    assert split.missing_counts == {"f0": 10, "channel": 5}


def test_labels_match_rows_whose_ids_were_written_with_another_type(tmp_path: Path) -> None:
    from data.workspace import Workspace

    ws = Workspace.at(tmp_path)
    night = NIGHTS[0]
    scores = pa.table(
        {
            "row_id": np.arange(100),
            "reconstruction_error": np.linspace(0, 1, 100),
            "is_anomaly": np.arange(100) >= 90,
            "model_version": ["v1"] * 100,
            "batch": ["b"] * 100,
        }
    )
    write_rows(scores, ws.output_partition("scores", night) / "b.parquet")
    # The reviewers' export holds the ids as text.
    _label_file(
        ws,
        "export.parquet",
        pd.DataFrame({"row_id": [str(i) for i in range(100)], "label": ["1" if i >= 95 else "0" for i in range(100)]}),
        mtime=1_000,
    )
    staged = tmp_path / "staged.parquet"
    stage_labels(ws, ["row_id"], "label", "0", staged)
    [row] = evaluate_dates(str(ws.root), [night], ["row_id"], str(staged))
    assert row["rows_labelled"] == 100 and row["labelled_anomalies"] == 5
    assert row["precision"] == pytest.approx(0.5) and row["recall"] == 1.0 and row["roc_auc"] == 1.0


def test_the_evaluation_flow_starts_without_tensorflow() -> None:
    import subprocess
    import sys

    # It reads bundle.json but never loads a model, so its process stays small.
    probe = "import sys, flows.evaluate; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
