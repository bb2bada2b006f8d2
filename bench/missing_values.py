"""Missing values: the tutorial's data with 5% of two features null, in training and at night, beside the complete data.

Both go through the flows as a user runs them: retraining on the training split's normal rows, the test split
scored as one night. Figures: ROC-AUC and PR-AUC of the night's scores, rows quarantined, the flag rate on the
night's normal rows, and how many values the model filled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.datasets import TUTORIAL, make_dataset
from bench.nights import best_rows_per_second, ranking, retrain_and_score

MISSING_SHARE = 0.05
MISSING_FEATURES = (0, 1)


def rows_table(features: np.ndarray, labels: np.ndarray, first_id: int, missing: np.ndarray | None) -> pa.Table:
    """Return rows as the product reads them, with the ``missing`` cells (a boolean mask) written as nulls."""
    columns = {"row_id": pa.array(np.arange(first_id, first_id + len(features)))}
    for j in range(features.shape[1]):
        columns[f"f{j:02d}"] = pa.array(features[:, j], mask=None if missing is None else missing[:, j])
    columns["label"] = pa.array(labels)
    return pa.table(columns)


def gaps(rows: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Return a mask with MISSING_SHARE of the cells of each of MISSING_FEATURES set, independently."""
    mask = np.zeros((rows, width), dtype=bool)
    for j in MISSING_FEATURES:
        mask[:, j] = rng.random(rows) < MISSING_SHARE
    return mask


def through_the_flows(workspace: Path, train: pa.Table, night: pa.Table) -> dict[str, Any]:
    """Retrain on ``train`` and score ``night``; return the night's ranking, quarantine and flag-rate figures."""
    run = retrain_and_score(workspace, train, night)
    scores = run.scores
    normal = scores["label"] == 0
    return {
        **ranking(scores["label"].to_numpy(), scores["reconstruction_error"].to_numpy()),
        "rows_scored": run.scored["rows_scored"],
        "rows_quarantined": run.scored["rows_quarantined"],
        "flag_rate_normal": float(scores.loc[normal, "is_anomaly"].mean()),
        "retrain_seconds": run.retrain_seconds,
        "promoted": run.trained["promoted"],
    }


def missing_values(work: Path, scale: float, log) -> dict[str, Any]:
    """The complete tutorial data and the same rows with gaps, each retrained and scored through the flows."""
    from sklearn.model_selection import train_test_split

    features, labels = make_dataset(TUTORIAL, scale)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.2, random_state=42, stratify=labels
    )
    rng = np.random.default_rng(0)
    train_gaps, night_gaps = gaps(len(x_train), x_train.shape[1], rng), gaps(len(x_test), x_test.shape[1], rng)
    result: dict[str, Any] = {"missing_share": MISSING_SHARE, "features_with_gaps": len(MISSING_FEATURES)}
    for key, (train_mask, night_mask) in {"complete": (None, None), "with_gaps": (train_gaps, night_gaps)}.items():
        train = rows_table(x_train, y_train, 0, train_mask)
        night = rows_table(x_test, y_test, len(x_train), night_mask)
        result[key] = through_the_flows(work / "missing-values" / key, train, night)
        figures = result[key]
        log(
            f"missing values, {key.replace('_', ' ')}: ROC-AUC {figures['roc_auc']:.3f}, "
            f"{figures['rows_quarantined']} rows quarantined, normal flag rate {figures['flag_rate_normal']:.4f}"
        )
    result["night_rows_with_a_gap"] = int(night_gaps.any(axis=1).sum())
    result["throughput"] = scoring_throughput(work / "missing-values" / "with_gaps", x_test, y_test, scale, log)
    result["roc_auc_drop"] = result["complete"]["roc_auc"] - result["with_gaps"]["roc_auc"]
    return result


def scoring_throughput(
    workspace: Path, features: np.ndarray, labels: np.ndarray, scale: float, log, repeats: int = 3
) -> dict[str, Any]:
    """Rows per second through the whole scoring path of one model: the same rows complete, and with gaps.

    Timed alternately, best of ``repeats``, so that the machine's noise falls on both alike.
    """
    copies = max(1, int(round(20 * scale)))
    x, y = np.tile(features, (copies, 1)), np.tile(labels, copies)
    files = {}
    for key, mask in (("complete", None), ("with_gaps", gaps(len(x), x.shape[1], np.random.default_rng(1)))):
        path = workspace / "bench" / f"{key}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table(x, y, 0, mask), path)
        files[key] = (workspace, path)
    rate = best_rows_per_second(files, len(x), repeats)
    ratio = rate["with_gaps"] / rate["complete"]
    log(f"missing values, scoring {len(x):,} rows: {rate['with_gaps']:,.0f} rows/s with gaps, {ratio:.2f} of complete")
    return {"rows": len(x), "rows_per_second": rate, "ratio_with_gaps_to_complete": ratio}


def render(result: dict[str, Any]) -> str:
    """Render the section as a Markdown table with its bars."""
    if not result:
        return ""
    lines = [
        f"Missing values: {result['missing_share']:.0%} of {result['features_with_gaps']} features null in training "
        f"and at night ({result['night_rows_with_a_gap']} night rows with a gap)",
        "",
        "| data | ROC-AUC | PR-AUC | rows scored | rows quarantined | normal flag rate |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("complete", "with_gaps"):
        m = result[key]
        lines.append(
            f"| {key.replace('_', ' ')} | {m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {m['rows_scored']} | "
            f"{m['rows_quarantined']} | {m['flag_rate_normal']:.4f} |"
        )
    quarantined = result["with_gaps"]["rows_quarantined"]
    speed = result["throughput"]
    lines += [
        "",
        f"ROC-AUC drop {result['roc_auc_drop']:.3f} (bar: at most 0.03); rows quarantined {quarantined} (bar: 0); "
        f"scoring {speed['rows']:,} rows with gaps at {speed['ratio_with_gaps_to_complete']:.2f} of the complete rows' "
        f"throughput, {speed['rows_per_second']['with_gaps']:,.0f} rows/s (bar: at least 0.8)",
    ]
    return "\n".join(lines) + "\n"
