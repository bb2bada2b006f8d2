"""Real tabular data: the product beside five classical detectors on the ADBench development datasets.

For each dataset (a ``.npz`` with ``X`` and ``y``, 1 = anomaly): a stratified 60/40 split; the
product retrains through its flow on the training split (its normal rows only, given with
``all_rows_normal``, or every row with the label column so that its labelled anomalies choose the
recipe), the test split is scored as one night through the scoring flow, and ROC-AUC and PR-AUC
come from the scores output. The peers are fitted on the same normal training rows:
IsolationForest (200 trees), k-NN (mean distance to the 5 nearest, standardised features), LOF
(20 neighbours, novelty mode), a Ledoit-Wolf Gaussian and PCA reconstruction (95% of variance), the
last three on standardised features too.

``python -m bench.adbench`` runs it on its own; ``python -m bench.run`` runs it as the section ``adbench``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.nights import ranking, retrain_and_score

DATASETS_ENV = "ANOMALY_ADBENCH_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "adbench"
PEERS = ("isolation_forest", "knn", "lof", "ledoit_wolf", "pca")
TEST_SHARE = 0.4


def dataset_dir() -> Path:
    """Return the folder of the ADBench ``.npz`` files: ANOMALY_ADBENCH_DIR, or ../shared/datasets/adbench."""
    return Path(os.environ.get(DATASETS_ENV) or DEFAULT_DIR)


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the features and labels of one ADBench file."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"], dtype=np.int64)


def feature_table(features: np.ndarray, labels: np.ndarray | None, first_id: int = 0) -> pa.Table:
    """Return rows as the product reads them: ``row_id``, ``f00``.. and, when given, ``label``."""
    width = max(2, len(str(features.shape[1] - 1)))
    columns = {"row_id": pa.array(np.arange(first_id, first_id + len(features)))}
    columns |= {f"f{j:0{width}d}": pa.array(features[:, j]) for j in range(features.shape[1])}
    if labels is not None:
        columns["label"] = pa.array(labels)
    return pa.table(columns)


def peer_scores(normal: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Score the test rows with each peer fitted on the normal training rows (higher: more anomalous)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(normal)
    train, held = scaler.transform(normal), scaler.transform(test)
    pca = PCA(n_components=0.95, svd_solver="full").fit(train)
    return {
        "isolation_forest": -IsolationForest(n_estimators=200, random_state=0).fit(normal).score_samples(test),
        "knn": NearestNeighbors(n_neighbors=5).fit(train).kneighbors(held)[0].mean(axis=1),
        "lof": -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(train).score_samples(held),
        "ledoit_wolf": LedoitWolf().fit(train).mahalanobis(held),
        "pca": np.square(held - pca.inverse_transform(pca.transform(held))).sum(axis=1),
    }


def product_run(
    workspace: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], labelled: bool
) -> dict[str, Any]:
    """Retrain and score one split through the flows; return the product's figures, or why it failed."""
    from data.errors import AnomalyJobError

    x_train, y_train = train
    x_test, y_test = test
    normal = y_train == 0
    training = feature_table(x_train, y_train) if labelled else feature_table(x_train[normal], None)
    night = feature_table(x_test, y_test, first_id=len(x_train))
    try:
        run = retrain_and_score(workspace, training, night, all_rows_normal=not labelled)
    except AnomalyJobError as exc:
        return {"status": "failed", "error": str(exc)}
    trained, scores = run.trained, run.scores
    normal_rows = scores["label"] == 0
    return {
        "status": "scored",
        **ranking(scores["label"].to_numpy(), scores["reconstruction_error"].to_numpy()),
        "flag_rate_normal": float(scores.loc[normal_rows, "is_anomaly"].mean()),
        "recall": float(scores.loc[~normal_rows, "is_anomaly"].mean()),
        "promoted": trained["promoted"],
        "recipe": trained["recipe"],
        "threshold_scheme": trained["threshold_scheme"],
        "retrain_seconds": run.retrain_seconds,
        "rows_scored": run.scored["rows_scored"],
    }


def evaluate_dataset(path: Path, work: Path, seed: int, log) -> dict[str, Any]:
    """The product, unlabelled and labelled, and the peers on one dataset's split."""
    from sklearn.model_selection import train_test_split

    features, labels = load(path)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_SHARE, stratify=labels, random_state=seed
    )
    name = path.stem
    row: dict[str, Any] = {
        "dataset": name,
        "seed": seed,
        "rows": len(labels),
        "features": features.shape[1],
        "normal_training_rows": int((y_train == 0).sum()),
        "training_anomalies": int(y_train.sum()),
        "test_anomalies": int(y_test.sum()),
    }
    for system, scores in peer_scores(x_train[y_train == 0], x_test).items():
        row[system] = ranking(y_test, scores)
    for mode, labelled in (("product", False), ("product_labelled", True)):
        row[mode] = product_run(work / f"{name}-{seed}-{mode}", (x_train, y_train), (x_test, y_test), labelled)
    systems = ("product", *PEERS)
    aucs = {s: row[s].get("roc_auc", -1.0) for s in systems}
    row["product_rank"] = 1 + sum(aucs[s] > aucs["product"] for s in PEERS)
    row["best_peer"] = max(PEERS, key=lambda s: aucs[s])
    product, labelled_run = row["product"], row["product_labelled"]
    log(
        f"{name} (seed {seed}): product ROC-AUC {product.get('roc_auc', float('nan')):.3f} ({product['status']}), "
        f"with labels {labelled_run.get('roc_auc', float('nan')):.3f} ({labelled_run.get('recipe')}); "
        f"IsolationForest {row['isolation_forest']['roc_auc']:.3f}, k-NN {row['knn']['roc_auc']:.3f}; "
        f"rank {row['product_rank']}"
    )
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The floors of the table.

    Every dataset scored, mean ROC-AUC against k-NN's, the worst gap to IsolationForest, the median flag rate.
    """
    summary: dict[str, Any] = {}
    for mode in ("product", "product_labelled"):
        scored = [r for r in rows if r[mode]["status"] == "scored"]
        means = {s: float(np.mean([r[s]["roc_auc"] for r in rows])) for s in PEERS}
        flag_rates = [r[mode]["flag_rate_normal"] for r in scored]
        summary[mode] = {
            "datasets": len(rows),
            "scored": len(scored),
            "mean_roc_auc": float(np.mean([r[mode]["roc_auc"] for r in scored])) if len(scored) == len(rows) else None,
            "mean_pr_auc": float(np.mean([r[mode]["pr_auc"] for r in scored])) if len(scored) == len(rows) else None,
            "peer_mean_roc_auc": means,
            "worst_gap_to_isolation_forest": (
                min(r[mode]["roc_auc"] - r["isolation_forest"]["roc_auc"] for r in scored) if scored else None
            ),
            "median_flag_rate_normal": float(np.median(flag_rates)) if flag_rates else None,
            "best_on": sum(r[mode]["roc_auc"] >= max(r[s]["roc_auc"] for s in PEERS) for r in scored),
        }
    return summary


def adbench(work: Path, log, seeds: tuple[int, ...] = (0,), only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run every dataset of the development folder (or those whose names contain one of ``only``)."""
    folder = dataset_dir()
    files = sorted(folder.glob("*.npz"))
    if only:
        files = [f for f in files if any(part in f.stem for part in only)]
    if not files:
        log(f"adbench: no .npz files in {folder} (set {DATASETS_ENV}); section skipped")
        return {"skipped": f"no datasets in {folder}"}
    rows = [evaluate_dataset(path, work, seed, log) for seed in seeds for path in files]
    return {"folder": str(folder), "seeds": list(seeds), "rows": rows, "summary": summarise(rows)}


def render(results: dict[str, Any]) -> str:
    """The table of the README.

    Per dataset, the product's ROC-AUC and PR-AUC beside the peers', its flag rate and rank.
    """
    if "rows" not in results:
        return ""
    head = (
        "| dataset | product ROC-AUC / PR-AUC | with labels (recipe) | IsolationForest | k-NN | LOF | Ledoit-Wolf | "
        "PCA | flag rate, test normal rows | rank |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]

    def pair(m: dict[str, Any]) -> str:
        return f"{m['roc_auc']:.3f} / {m['pr_auc']:.3f}" if "roc_auc" in m else m.get("status", "-")

    for row in results["rows"]:
        p, lab = row["product"], row["product_labelled"]
        peers = " | ".join(pair(row[s]) for s in PEERS)
        flag = f"{p['flag_rate_normal']:.2%}" if "flag_rate_normal" in p else "-"
        lines.append(
            f"| {row['dataset']} | {pair(p)} | {pair(lab)} ({lab.get('recipe', '-')}) | {peers} | {flag} | "
            f"{row['product_rank']} |"
        )
    s = results["summary"]
    mean = " | ".join(f"{s['product']['peer_mean_roc_auc'][p]:.3f}" for p in PEERS)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines.append(
        f"| mean ROC-AUC | {fmt(s['product']['mean_roc_auc'])} | {fmt(s['product_labelled']['mean_roc_auc'])} | {mean} "
        "| - | - |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the datasets and print the table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="split seeds, comma-separated (default: 0)")
    parser.add_argument("--only", nargs="*", default=[], help="datasets whose names contain one of these")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="anomaly-adbench-") as tmp:
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        results = adbench(Path(tmp), log, tuple(int(s) for s in args.seeds.split(",")), tuple(args.only))
    print(render(results))
    print(json.dumps(results.get("summary", results), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
