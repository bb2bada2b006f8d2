"""The benchmark suite: quality against the Gaussian limit, training time, scoring throughput and memory, as ratios.

Run ``make bench`` (or ``python -m bench.run [--quick]``). Writes bench/results/latest.json and latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench.datasets import (
    OTHERS,
    TUTORIAL,
    DatasetSpec,
    digits_as_anomaly_sets,
    make_dataset,
    normal_class,
    write_large_batch,
    write_training_file,
)
from data import storage
from data.outputs import batch_outputs
from data.parquet import LabelRule, feature_matrix
from data.workspace import Workspace
from models.autoencoder import reconstruction_errors
from models.bundle import load_bundle, promote, staging_dir
from models.config import resolve_preset
from models.runtime import cpu_threads, keras, tf
from models.scoring.batch import score_file
from models.scoring.streaming import ScoringOptions
from models.training import retraining
from models.training.results import TrainedModel, TrainingSplit

RESULTS = Path(__file__).parent / "results"
PERCENTILE = 98.0


def detection_metrics(errors: np.ndarray, threshold: float, labels: np.ndarray) -> dict[str, float]:
    """Recall, precision, F1, ROC-AUC and PR-AUC of the anomaly class at a fixed threshold."""
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    flagged = errors > threshold
    return {
        "recall": float(recall_score(labels, flagged)),
        "precision": float(precision_score(labels, flagged, zero_division=0)),
        "f1": float(f1_score(labels, flagged)),
        "roc_auc": float(roc_auc_score(labels, errors)),
        "pr_auc": float(average_precision_score(labels, errors)),
    }


def retrain(
    preset: str, training_file: Path, staging: Path, choose: bool = True, **overrides: Any
) -> tuple[TrainedModel, float, keras.Model]:
    """Run the product's retraining steps; return what they made, the fit+threshold seconds and the model.

    With ``choose=False`` no recipe is chosen.
    """
    config = resolve_preset(preset, **overrides)
    split = retraining.split_training_data(
        str(training_file), staging, LabelRule("label", "0", False), 0.2, PERCENTILE, config.seed
    )
    started = time.perf_counter()
    # Overrides name one recipe: candidates are chosen among only for the preset as it is.
    recipe = retraining.choose_recipe(split, preset if choose and not overrides else "", config, staging)
    fit = retraining.train_model(split.train_path, split.feature_names, recipe.config, staging)
    errors_path = retraining.compute_holdout_errors(
        staging, split, fit.config, normal_errors_path=recipe.normal_errors_path
    )
    threshold = retraining.fix_threshold_from_errors(errors_path, PERCENTILE)
    seconds = time.perf_counter() - started
    model = keras.saving.load_model(staging / "model.keras", compile=False, safe_mode=True)
    trained = TrainedModel("", preset, LabelRule("label", "0"), split, recipe, fit, threshold, errors_path)
    return trained, seconds, model


def tutorial_recipe_seconds(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> float:
    """Seconds of the tutorial's code as published: fit, predict, percentile.

    The fit runs 20 epochs with batch 64 and validation on the test rows.
    """
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    x_normal = x_train[y_train == 0]
    inputs = keras.Input(shape=(x_train.shape[1],))
    encoder = keras.Sequential(
        [
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(4, activation="relu"),
        ]
    )(inputs)
    decoder = keras.Sequential(
        [
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(x_train.shape[1], activation="sigmoid"),
        ]
    )(encoder)
    autoencoder = keras.Model(inputs=inputs, outputs=decoder)
    autoencoder.compile(optimizer="adam", loss="mae")
    autoencoder.fit(
        x_normal, x_normal, epochs=20, batch_size=64, validation_data=(x_test, x_test), shuffle=True, verbose=0
    )
    prediction = autoencoder.predict(x_test, verbose=0)
    np.percentile(keras.losses.mean_absolute_error(x_test, prediction).numpy(), 98)
    return time.perf_counter() - started


def split_rows(split: TrainingSplit) -> tuple[np.ndarray, np.ndarray]:
    """Return the training rows and the held-out normal rows of a product split, for the reference detectors."""
    names = split.feature_names
    train = feature_matrix(pq.read_table(split.train_path), names, np.float64)
    holdout_table = pq.read_table(split.holdout_path)
    holdout = feature_matrix(holdout_table, names, np.float64)[
        ~holdout_table.column("labelled_anomaly").to_numpy(zero_copy_only=False)
    ]
    return train, holdout


def reference_metrics(score, split: TrainingSplit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Metrics of a reference detector ``score`` (rows -> anomaly score), its threshold fixed as the product's is."""
    train, holdout = split_rows(split)
    # A cross-fitted split holds no normal row out; a reference detector's threshold is then fixed on its training
    # rows (in sample, as it has no out-of-fold scores).
    unseen = holdout if len(holdout) else train
    return detection_metrics(score(x_test), float(np.percentile(score(unseen), PERCENTILE)), y_test)


def gaussian_limit(split: TrainingSplit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """The optimal detector for this data: Mahalanobis distance to the normal class, threshold fixed the same way.

    The pseudo-inverse leaves out directions without variance, where redundant features make the covariance singular.
    """
    train, _ = split_rows(split)
    mean = train.mean(axis=0)
    precision = np.linalg.pinv(np.cov(train, rowvar=False), rcond=1e-10, hermitian=True)

    def distance(x: np.ndarray) -> np.ndarray:
        centred = x - mean
        return np.einsum("ij,jk,ik->i", centred, precision, centred)

    return reference_metrics(distance, split, x_test, y_test)


def ledoit_wolf_gaussian(split: TrainingSplit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """A Gaussian of the normal class with a shrunk covariance (Ledoit-Wolf), for data too small for the plain one."""
    from sklearn.covariance import LedoitWolf

    model = LedoitWolf().fit(split_rows(split)[0])
    return reference_metrics(model.mahalanobis, split, x_test, y_test)


def isolation_forest(split: TrainingSplit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """scikit-learn's IsolationForest fitted on the normal training rows, with its default settings."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(random_state=0).fit(split_rows(split)[0])
    return reference_metrics(lambda x: -forest.score_samples(x), split, x_test, y_test)


def small_real_data(work: Path, log) -> list[dict[str, Any]]:
    """The default preset against a Ledoit-Wolf Gaussian and IsolationForest on scikit-learn's digits.

    They train on all normal rows, and on 300 of them.

    Each digit in turn is the anomaly class; figures are means over the ten digits, with the worst digit's ROC-AUC.
    """
    rows = []
    for label, cut in (("digits, one digit anomalous", None), ("digits, 300 normal training rows", 300)):
        per_digit: dict[str, list[dict[str, float]]] = {
            "default": [],
            "gaussian_ledoit_wolf": [],
            "isolation_forest": [],
        }
        for digit, x_train, y_train, x_test, y_test in digits_as_anomaly_sets(cut):
            training_file = write_training_file(x_train, y_train, work / "digits" / f"{cut}-{digit}" / "train.parquet")
            trained, seconds, model = retrain(
                "default", training_file, staging_dir(work / "digits" / f"{cut}-{digit}" / "models", "default")
            )
            split, threshold = trained.split, trained.threshold
            per_digit["default"].append(
                {
                    **detection_metrics(
                        reconstruction_errors(model, x_test, trained.fit.config.loss), threshold.value, y_test
                    ),
                    "fit_and_threshold_seconds": seconds,
                }
            )
            per_digit["gaussian_ledoit_wolf"].append(ledoit_wolf_gaussian(split, x_test, y_test))
            per_digit["isolation_forest"].append(isolation_forest(split, x_test, y_test))
        row: dict[str, Any] = {
            "dataset": label,
            "training_rows": split.rows_train,
            "holdout_rows": split.rows_threshold,
            "threshold_warning": threshold.warning,
        }
        for system, runs in per_digit.items():
            row[system] = {metric: float(np.mean([r[metric] for r in runs])) for metric in runs[0]} | {
                "worst_roc_auc": float(min(r["roc_auc"] for r in runs))
            }
        row["default_roc_auc_minus_isolation_forest"] = row["default"]["roc_auc"] - row["isolation_forest"]["roc_auc"]
        log(
            f"{label}: ROC-AUC default {row['default']['roc_auc']:.3f}, Ledoit-Wolf "
            f"{row['gaussian_ledoit_wolf']['roc_auc']:.3f}, IsolationForest {row['isolation_forest']['roc_auc']:.3f}"
        )
        rows.append(row)
    return rows


def quality_and_training(spec: DatasetSpec, work: Path, scale: float, with_seed: bool, log) -> dict[str, Any]:
    """Default preset, seed preset (optional) and the Gaussian limit on one dataset; fit times side by side."""
    from sklearn.model_selection import train_test_split

    features, labels = make_dataset(spec, scale)
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.2, random_state=42)
    training_file = write_training_file(x_train, y_train, work / spec.name / "train.parquet")
    result: dict[str, Any] = {
        "dataset": spec.name,
        "rows": len(labels),
        "features": spec.n_features,
        "test_anomalies": int(y_test.sum()),
    }

    trained, seconds, model = retrain("default", training_file, staging_dir(work / spec.name / "models", "default"))
    result["default"] = {
        **detection_metrics(reconstruction_errors(model, x_test, "mse"), trained.threshold.value, y_test),
        "fit_and_threshold_seconds": seconds,
        "epochs_run": trained.fit.epochs_run,
    }
    log(
        f"{spec.name}: default recall {result['default']['recall']:.3f} roc_auc {result['default']['roc_auc']:.3f} in "
        f"{seconds:.1f} s"
    )
    result["limit"] = gaussian_limit(trained.split, x_test, y_test)
    log(f"{spec.name}: limit recall {result['limit']['recall']:.3f} roc_auc {result['limit']['roc_auc']:.3f}")
    result["default_recall_share_of_limit"] = result["default"]["recall"] / result["limit"]["recall"]
    result["default_roc_auc_gap_to_limit"] = result["limit"]["roc_auc"] - result["default"]["roc_auc"]
    result["_default_run"] = trained
    result["default"]["recipe"] = trained.recipe.name
    # The default recipe as training without labelled anomalies runs it (no recipe chosen), and where features
    # are combinations of others, standardised only: what choosing a recipe, and whitening, buy.
    variants = [("default_unlabelled", {})] + (
        [("standardised_only", {"decorrelate_inputs": False})] if spec.n_redundant else []
    )
    for key, overrides in variants:
        plain, plain_seconds, plain_model = retrain(
            "default", training_file, staging_dir(work / spec.name / "models", key), choose=False, **overrides
        )
        result[key] = {
            **detection_metrics(reconstruction_errors(plain_model, x_test, "mse"), plain.threshold.value, y_test),
            "fit_and_threshold_seconds": plain_seconds,
        }
        log(
            f"{spec.name}: {key.replace('_', ' ')}, recall {result[key]['recall']:.3f} roc_auc "
            f"{result[key]['roc_auc']:.3f}"
        )
    if with_seed:
        seeded, seed_seconds, seed_model = retrain(
            "seed", training_file, staging_dir(work / spec.name / "models", "seed")
        )
        result["seed"] = {
            **detection_metrics(reconstruction_errors(seed_model, x_test, "mae"), seeded.threshold.value, y_test),
            "fit_and_threshold_seconds": seed_seconds,
            "epochs_run": seeded.fit.epochs_run,
        }
        log(f"{spec.name}: seed preset recall {result['seed']['recall']:.3f} in {seed_seconds:.1f} s")
        result["tutorial_recipe_seconds"] = tutorial_recipe_seconds(x_train, y_train, x_test)
        result["training_time_ratio_default_to_tutorial"] = seconds / result["tutorial_recipe_seconds"]
        result["training_time_ratio_unlabelled_default_to_tutorial"] = (
            result["default_unlabelled"]["fit_and_threshold_seconds"] / result["tutorial_recipe_seconds"]
        )
        log(
            f"{spec.name}: tutorial recipe as published {result['tutorial_recipe_seconds']:.1f} s; "
            f"default / tutorial = {result['training_time_ratio_default_to_tutorial']:.2f}"
        )
    return result


def publish_for_scoring(trained: TrainedModel, staging: Path, workspace: Workspace) -> None:
    """Turn the tutorial's default-preset staging folder into the workspace's current bundle."""
    version = "20000101T000000Z"
    retraining.write_bundle(staging, dataclasses.replace(trained, version=version))
    target = workspace.models_dir / f"{version}.partial"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    retraining.publish_version(target)
    promote(workspace.models_dir, version)


def throughput(workspace: Workspace, n_rows: int, rows_like: tuple[np.ndarray, np.ndarray], log) -> dict[str, Any]:
    """Rows per second of the scoring path, the read+forward floor and the tutorial's predict+mae path.

    The rows are drawn like ``rows_like``.
    """
    bundle = load_bundle(workspace.version_dir("20000101T000000Z"))
    names = bundle.feature_names
    source = write_large_batch(workspace.root / "bench" / f"batch-{n_rows}.parquet", n_rows, distribution=rows_like)
    warmup = write_large_batch(workspace.root / "bench" / "warmup.parquet", 50_000, distribution=rows_like)
    when = dt.datetime.now(dt.UTC)
    score_file(
        bundle,
        warmup,
        "warmup",
        batch_outputs(workspace, dt.date(2000, 1, 1), "warmup"),
        ScoringOptions(scored_at=when),
    )

    forward = tf.function(
        lambda x: bundle.model(x, training=False), input_signature=[tf.TensorSpec([None, len(names)], tf.float32)]
    )

    def floor() -> None:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=262_144, columns=names):
            forward(feature_matrix(batch, names))

    flag_rates = []

    def product() -> None:
        flag_rates.append(
            score_file(
                bundle,
                source,
                "big",
                batch_outputs(workspace, dt.date(2000, 1, 1), "big"),
                ScoringOptions(scored_at=when),
            ).summary["flag_rate"]
        )

    def without_reasons() -> None:
        score_file(
            bundle,
            source,
            "big",
            batch_outputs(workspace, dt.date(2000, 1, 1), "big"),
            ScoringOptions(scored_at=when, reason_count=0),
        )

    # The same bundle as one written before drift references were kept: no feature bins are counted.
    no_drift_bundle = dataclasses.replace(
        bundle, metadata={k: v for k, v in bundle.metadata.items() if k != "drift_reference"}
    )
    score_file(
        no_drift_bundle,
        warmup,
        "warmup",
        batch_outputs(workspace, dt.date(2000, 1, 1), "warmup"),
        ScoringOptions(scored_at=when),
    )

    def without_drift() -> None:
        score_file(
            no_drift_bundle,
            source,
            "big",
            batch_outputs(workspace, dt.date(2000, 1, 1), "big"),
            ScoringOptions(scored_at=when),
        )

    def tutorial(path: Path) -> None:
        x = pq.read_table(path, columns=names).to_pandas().to_numpy()
        prediction = bundle.model.predict(x, verbose=0)
        keras.losses.mean_absolute_error(x, prediction).numpy()

    timings: dict[str, float] = {}
    floor()  # trace the floor's function once, as the product's was traced by the warm-up
    for name, fn in (
        ("floor", floor),
        ("product", product),
        ("without_reasons", without_reasons),
        ("without_drift", without_drift),
    ) * 2:
        started = time.perf_counter()
        fn()
        timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - started)
    # predict() at its default batch size of 32 is slow enough that a slice of the batch gives its rate.
    tutorial_rows = min(n_rows, 400_000)
    tutorial_source = (
        source
        if tutorial_rows == n_rows
        else write_large_batch(
            workspace.root / "bench" / f"batch-{tutorial_rows}.parquet", tutorial_rows, distribution=rows_like
        )
    )
    started = time.perf_counter()
    tutorial(tutorial_source)
    timings["tutorial"] = time.perf_counter() - started
    rates = {
        "product_rows_per_s": n_rows / timings["product"],
        "floor_rows_per_s": n_rows / timings["floor"],
        "without_reasons_rows_per_s": n_rows / timings["without_reasons"],
        "without_drift_rows_per_s": n_rows / timings["without_drift"],
        "tutorial_rows_per_s": tutorial_rows / timings["tutorial"],
    }
    log(
        f"throughput on {n_rows} rows ({flag_rates[0]:.2%} flagged): product {rates['product_rows_per_s']:.0f}/s "
        f"(without reasons {rates['without_reasons_rows_per_s']:.0f}/s), floor {rates['floor_rows_per_s']:.0f}/s, "
        f"tutorial {rates['tutorial_rows_per_s']:.0f}/s"
    )
    return {
        "rows": n_rows,
        "flag_rate": flag_rates[0],
        "tutorial_rows": tutorial_rows,
        **rates,
        "product_to_floor": rates["product_rows_per_s"] / rates["floor_rows_per_s"],
        "product_to_tutorial": rates["product_rows_per_s"] / rates["tutorial_rows_per_s"],
        "with_reasons_to_without": rates["product_rows_per_s"] / rates["without_reasons_rows_per_s"],
        "with_drift_to_without": rates["product_rows_per_s"] / rates["without_drift_rows_per_s"],
        "seconds": timings,
    }


def prefect_startup(log) -> dict[str, float]:
    """Seconds a trivial flow takes in a new process with Prefect's embedded server, against importing Prefect only."""
    code_flow = "from prefect import flow\n@flow\ndef noop():\n    return 1\nnoop()\n"
    env = {
        **os.environ,
        "PREFECT_HOME": tempfile.mkdtemp(prefix="bench-prefect-"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    timings = {}
    for name, code in (
        ("import_only", "import prefect"),
        ("trivial_flow_first", code_flow),
        ("trivial_flow_again", code_flow),
    ):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        timings[name] = time.perf_counter() - started
    log(
        f"prefect start-up: trivial flow {timings['trivial_flow_again']:.1f} s against import "
        f"{timings['import_only']:.1f} s"
    )
    return {**timings, "startup_overhead_s": timings["trivial_flow_again"] - timings["import_only"]}


def probe_memory(root: str, night: dt.date, what: str, log, dask_workers: int = 0) -> dict[str, Any]:
    """Score ``night`` of the workspace at ``root`` in a fresh flow process; return its rows, seconds and peak RSS."""
    command = [
        sys.executable,
        "-m",
        "bench.memory_probe",
        root,
        "--run-date",
        night.isoformat(),
        "--dask-workers",
        str(dask_workers),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode:
        raise RuntimeError(f"memory probe of {what} failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"memory, {what}: flow process peak {run['peak_rss_mb']:.0f} MB in {run['seconds']:.0f} s")
    return run


def memory(
    workspace: Workspace, sizes: tuple[int, int], rows_like: tuple[np.ndarray, np.ndarray], log
) -> dict[str, Any]:
    """Peak resident memory of the scoring flow's process on a labelled night of each size, in one process and on Dask.

    Each run is a fresh process; a night is one file, so nothing but the streaming keeps memory flat.
    """
    nights = {}
    for i, n_rows in enumerate(sizes):
        night = dt.date(2002, 1, 1 + i)
        write_large_batch(
            workspace.incoming_for(night) / f"memory-{n_rows}.parquet",
            n_rows,
            seed=200 + i,
            anomaly_share=0.01,
            distribution=rows_like,
        )
        nights[n_rows] = night
    out: dict[str, Any] = {}
    for mode, workers in (("single_process", 0), (f"dask_{cpu_threads()}_workers", cpu_threads())):
        runs: dict[str, Any] = {}
        for n_rows, night in nights.items():
            runs[str(n_rows)] = probe_memory(
                str(workspace.root), night, f"labelled night of {n_rows} rows, {mode}", log, dask_workers=workers
            )
        small, large = (runs[str(n)]["peak_rss_mb"] for n in sizes)
        runs["peak_difference_mb"] = large - small
        out[mode] = runs
    for night in nights.values():
        for path in workspace.incoming_for(night).glob("*.parquet"):
            path.unlink()
    return out


def retraining_memory(
    work: Path, sizes: tuple[int, int], max_rows: int, rows_like: tuple[np.ndarray, np.ndarray], log
) -> dict[str, Any]:
    """Peak resident memory of retraining (one epoch) on training sets of each size with one ``max_training_rows``.

    Each set is one workspace of several files, each run a fresh process: the sample keeps memory flat.
    """
    out: dict[str, Any] = {"max_training_rows": max_rows}
    for i, n_rows in enumerate(sizes):
        root = work / f"retrain-memory-{n_rows}"
        files = 4
        for k in range(files):
            write_large_batch(
                Workspace.at(root).training_dir / f"part-{k}.parquet",
                n_rows // files,
                len(rows_like[0]),
                seed=300 + 10 * i + k,
                anomaly_share=0.01,
                distribution=rows_like,
            )
        command = [sys.executable, "-m", "bench.memory_probe", str(root), "--run-date", "2000-01-01"]
        command += ["--retrain-max-rows", str(max_rows)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        out[str(n_rows)] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"retraining on {n_rows:,} rows (max {max_rows:,}): peak {out[str(n_rows)]['peak_rss_mb']:.0f} MB")
        shutil.rmtree(root)
    small, large = (out[str(n)]["peak_rss_mb"] for n in sizes)
    out["peak_difference_mb"] = large - small
    return out


def object_storage(
    workspace: Workspace, n_rows: int, sizes: tuple[int, int], rows_like: tuple[np.ndarray, np.ndarray], log
) -> dict[str, Any]:
    """Scoring throughput with the workspace in an S3 bucket on loopback (moto) against a local disk.

    Also the flow's peak memory with the workspace in the bucket.
    """
    from tests.object_store import loopback_s3

    with loopback_s3(read_timeout_s=1800) as s3:
        remote = Workspace.at(
            s3.upload_tree(workspace.models_dir, f"{s3.bucket('anomaly-bench')}/workspace/models")
            .removesuffix("/models")
        )
        local_source = write_large_batch(
            workspace.root / "bench" / f"s3-batch-{n_rows}.parquet", n_rows, distribution=rows_like
        )
        remote_source = remote.root / "bench" / local_source.name
        s3.fs.put_file(str(local_source), remote_source.path)
        bundles = {
            "local": load_bundle(workspace.version_dir("20000101T000000Z")),
            "s3": load_bundle(remote.version_dir("20000101T000000Z")),
        }
        sources = {"local": local_source, "s3": remote_source}
        spaces = {"local": workspace, "s3": remote}
        when = dt.datetime.now(dt.UTC)
        timings = {"local": float("inf"), "s3": float("inf")}
        for round_ in range(3):  # the first round warms up
            for name in timings:
                started = time.perf_counter()
                score_file(
                    bundles[name],
                    sources[name],
                    "big",
                    batch_outputs(spaces[name], dt.date(2000, 1, 2), "big"),
                    ScoringOptions(scored_at=when),
                )
                if round_:
                    timings[name] = min(timings[name], time.perf_counter() - started)
        rates = {name: n_rows / seconds for name, seconds in timings.items()}
        log(
            f"throughput on {n_rows} rows: workspace in S3 (loopback) {rates['s3']:.0f}/s, "
            f"local disk {rates['local']:.0f}/s"
        )

        runs: dict[str, Any] = {}
        for i, size in enumerate(sizes):
            night = dt.date(2003, 1, 1 + i)
            local_night = write_large_batch(
                workspace.root / "bench" / f"s3-memory-{size}.parquet",
                size,
                seed=300 + i,
                anomaly_share=0.01,
                distribution=rows_like,
            )
            s3.fs.put_file(str(local_night), (remote.incoming_for(night) / local_night.name).path)
            local_night.unlink()
            runs[str(size)] = probe_memory(
                str(remote.root), night, f"labelled night of {size} rows, workspace in S3", log
            )
        small, large = (runs[str(n)]["peak_rss_mb"] for n in sizes)
    return {
        "rows": n_rows,
        "s3_rows_per_s": rates["s3"],
        "local_rows_per_s": rates["local"],
        "s3_to_local": rates["s3"] / rates["local"],
        "seconds": timings,
        "memory": {**runs, "peak_difference_mb": large - small},
    }


def evaluation_memory(workspace: Workspace, nights: int, rows_per_night: int, log) -> dict[str, Any]:
    """Peak resident memory of the evaluation flow on one scored night and on ``nights`` of them, each a fresh process.

    The scores outputs are written directly (2% flagged); labels cover every flagged row and a tenth
    of the others, in one label file per night, and both runs see all of them.
    """
    import pyarrow as pa

    from data.labels import labels_dir

    rng = np.random.default_rng(7)
    first = dt.date(2003, 1, 1)
    dates = [first + dt.timedelta(days=i) for i in range(nights)]
    labels = storage.make_dir(labels_dir(workspace))
    for i, date in enumerate(dates):
        ids = np.arange(i * rows_per_night, (i + 1) * rows_per_night, dtype=np.int64)
        truth = rng.random(rows_per_night) < 0.01
        errors = rng.gamma(2.0, 1.0, rows_per_night) + 3.0 * truth
        flagged = errors > np.quantile(errors, 0.98)
        scores = pa.table(
            {
                "row_id": ids,
                "reconstruction_error": errors,
                "is_anomaly": flagged,
                "model_version": pa.array(["20000101T000000Z"] * rows_per_night),
                "batch": pa.array(["night"] * rows_per_night),
            }
        )
        pq.write_table(scores, storage.make_dir(workspace.output_partition("scores", date)) / "night.parquet")
        labelled = flagged | (rng.random(rows_per_night) < 0.1)
        pq.write_table(
            pa.table({"row_id": ids[labelled], "label": truth[labelled].astype(np.int64)}),
            labels / f"night-{i:02d}.parquet",
        )
    log(f"evaluation memory: wrote {nights} nights of {rows_per_night:,} scored rows and their labels")
    runs: dict[str, Any] = {}
    for days in (1, nights):
        command = [
            sys.executable,
            "-m",
            "bench.memory_probe",
            os.fspath(workspace.root),
            "--run-date",
            dates[-1].isoformat(),
            "--evaluate-days",
            str(days),
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if done.returncode:
            raise RuntimeError(f"evaluation memory probe over {days} night(s) failed:\n{done.stderr[-3000:]}")
        runs[str(days)] = json.loads(done.stdout.strip().splitlines()[-1])
        log(
            f"evaluation memory, {days} night(s), {runs[str(days)]['rows']:,} scored rows: "
            f"peak {runs[str(days)]['peak_rss_mb']:.0f} MB in {runs[str(days)]['seconds']:.0f} s"
        )
    runs["nights"] = nights
    runs["rows_per_night"] = rows_per_night
    runs["peak_difference_mb"] = runs[str(nights)]["peak_rss_mb"] - runs["1"]["peak_rss_mb"]
    storage.remove_tree(labels)
    return runs


def dask_scaling(
    workspace: Workspace, n_files: int, rows_per_file: int, repeats: int, rows_like: tuple[np.ndarray, np.ndarray], log
) -> dict[str, Any]:
    """Rows per second of the scoring flow in one process and on local Dask clusters of 1 and 2 workers.

    The clusters are started beforehand.

    The three set-ups take turns, ``repeats`` times, and each keeps its best time, so that a slow
    spell of a shared machine does not fall on one of them only.
    """
    from distributed import LocalCluster

    from flows.score import score_flow

    night, warmup = dt.date(2001, 1, 1), dt.date(2001, 1, 2)
    for i in range(n_files):
        write_large_batch(
            workspace.incoming_for(night) / f"part-{i}.parquet", rows_per_file, seed=i, distribution=rows_like
        )
    # one small file per file of the night, so every worker imports TensorFlow and loads the model
    for i in range(n_files):
        write_large_batch(
            workspace.incoming_for(warmup) / f"warmup-{i}.parquet", 20_000, seed=100 + i, distribution=rows_like
        )
    rows = n_files * rows_per_file

    def timed(**options: Any) -> float:
        started = time.perf_counter()
        outcome = score_flow(workspace=str(workspace.root), run_date=night, force=True, **options)
        assert outcome["rows_scored"] == rows, outcome
        return time.perf_counter() - started

    setups: dict[str, dict[str, Any]] = {"single_process": {}}
    cluster_start = {}
    with contextlib.ExitStack() as clusters:
        for workers, threads in ((1, cpu_threads()), (cpu_threads(), 1)):
            label = f"dask_{workers}_workers_x_{threads}_threads"
            started = time.perf_counter()
            cluster = clusters.enter_context(
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=threads,
                    processes=True,
                    dashboard_address=None,
                    env={"ANOMALY_TF_THREADS": str(threads)},
                )
            )
            cluster_start[label] = time.perf_counter() - started
            setups[label] = {"dask_address": cluster.scheduler_address}
        for options in setups.values():
            score_flow(workspace=str(workspace.root), run_date=warmup, force=True, **options)
        seconds: dict[str, list[float]] = {label: [] for label in setups}
        for _ in range(repeats):
            for label, options in setups.items():
                seconds[label].append(timed(**options))
    best = {label: min(times) for label, times in seconds.items()}
    rates = {label: rows / s for label, s in best.items()}
    log(f"dask scaling (best of {repeats}): " + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in rates.items()))
    return {
        "files": n_files,
        "rows": rows,
        "repeats": repeats,
        "rows_per_s": rates,
        "seconds": seconds,
        "cluster_start_seconds": cluster_start,
        "ratios_to_single_process": {k: v / rates["single_process"] for k, v in rates.items() if k != "single_process"},
    }


def render_table(results: dict[str, Any]) -> str:
    """Render the results as Markdown tables with the bars they are held to."""
    lines = [
        "| dataset | system | recall | precision | F1 | ROC-AUC | PR-AUC | fit+threshold s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["quality"]:
        for system in ("default", "default_unlabelled", "standardised_only", "seed", "limit"):
            if system in row:
                m = row[system]
                seconds = f"{m['fit_and_threshold_seconds']:.1f}" if "fit_and_threshold_seconds" in m else "-"
                name = system.replace("_", " ") + (f" (recipe chosen: {m['recipe']})" if "recipe" in m else "")
                lines.append(
                    f"| {row['dataset']} | {name} | {m['recall']:.3f} | {m['precision']:.3f} | {m['f1']:.3f} | "
                    f"{m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {seconds} |"
                )
    for row in results.get("small_real_data", []):
        for system in ("default", "gaussian_ledoit_wolf", "isolation_forest"):
            m = row[system]
            seconds = f"{m['fit_and_threshold_seconds']:.1f}" if "fit_and_threshold_seconds" in m else "-"
            lines.append(
                f"| {row['dataset']} (mean of 10; worst ROC-AUC {m['worst_roc_auc']:.3f}) "
                f"| {system.replace('_', ' ')} | {m['recall']:.3f} | {m['precision']:.3f} | {m['f1']:.3f} | "
                f"{m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {seconds} |"
            )
    lines += ["", "| figure | value | bar |", "|---|---|---|"]
    for row in results["quality"]:
        bar = ">= 0.95"
        lines.append(
            f"| {row['dataset']}: default recall / limit recall | {row['default_recall_share_of_limit']:.3f} | {bar} |"
        )
        lines.append(
            f"| {row['dataset']}: limit ROC-AUC - default ROC-AUC | {row['default_roc_auc_gap_to_limit']:.3f} "
            "| <= 0.02 |"
        )
        if "training_time_ratio_default_to_tutorial" in row:
            lines.append(
                f"| {row['dataset']}: default fit+threshold {row['default']['fit_and_threshold_seconds']:.1f} s / "
                f"tutorial recipe as published {row['tutorial_recipe_seconds']:.1f} s | "
                f"{row['training_time_ratio_default_to_tutorial']:.3f} | <= 0.3 |"
            )
            unlabelled = row["default_unlabelled"]["fit_and_threshold_seconds"]
            lines.append(
                f"| {row['dataset']}: the same without a recipe choice ({unlabelled:.1f} s) "
                f"| {row['training_time_ratio_unlabelled_default_to_tutorial']:.3f} | - |"
            )
    for row in results.get("small_real_data", []):
        lines.append(
            f"| {row['dataset']} ({row['training_rows']} training / {row['holdout_rows']} held-out rows): "
            f"default ROC-AUC - IsolationForest ROC-AUC | {row['default_roc_auc_minus_isolation_forest']:.3f} | >= 0 |"
        )
    if "retraining_memory" in results:
        m = results["retraining_memory"]
        small, large = (k for k in m if k.isdigit())
        lines.append(
            f"| retraining peak memory, {int(large):,} training rows - {int(small):,} "
            f"(max_training_rows {m['max_training_rows']:,}) | {m['peak_difference_mb']:+.0f} MB | <= +150 MB |"
        )
    if "backfill" in results:
        b = results["backfill"]
        lines.append(
            f"| backfill of {b['dates']} dates of {b['rows_per_date']:,} rows / {b['dates']} `anomaly score` commands "
            f"({b['backfill_seconds']:.1f} s / {b['single_date_runs_seconds']:.1f} s) | {b['ratio']:.2f} | <= 0.6 |"
        )
    if "small_files" in results:
        for pair, bar in (("small_night", "<= 2"), ("large_night", "<= 1.5")):
            many, few = results["small_files"][pair]["many"], results["small_files"][pair]["few"]
            lines.append(
                f"| {many['files']:,} files x {many['rows_per_file']:,} rows / {few['files']:,} file(s) x "
                f"{few['rows_per_file']:,} rows, scored ({many['seconds']:.1f} s / {few['seconds']:.1f} s) "
                f"| {results['small_files'][pair]['ratio']:.2f} | {bar} |"
            )
    if "throughput" in results:
        t = results["throughput"]
        lines.append(
            f"| scoring throughput, {t['rows']:,} rows, {t['flag_rate']:.1%} flagged (rows/s) "
            f"| {t['product_rows_per_s']:,.0f} | - |"
        )
        lines.append(
            f"| scoring / floor (pyarrow read + compiled forward pass) | {t['product_to_floor']:.3f} | >= 0.6 |"
        )
        lines.append(f"| scoring / tutorial path (predict + mae) | {t['product_to_tutorial']:.1f} | >= 20 |")
        lines.append(
            f"| scoring with 3 reasons per flagged row / without reasons ({t['without_reasons_rows_per_s']:,.0f} "
            f"rows/s without) | {t['with_reasons_to_without']:.3f} | >= 0.85 |"
        )
        if "with_drift_to_without" in t:
            lines.append(
                f"| scoring with drift counting / without ({t['without_drift_rows_per_s']:,.0f} rows/s without) "
                f"| {t['with_drift_to_without']:.3f} | >= 0.9 |"
            )
    if "dask" in results:
        d = results["dask"]
        for label, ratio in d["ratios_to_single_process"].items():
            bar = ">= 0.9" if label.startswith(f"dask_{results['machine']['cpus']}_workers") else "-"
            lines.append(
                f"| scoring flow, {d['files']} files / {d['rows']:,} rows, best of {d['repeats']}: "
                f"{label.replace('_', ' ')} / single process ({d['rows_per_s'][label]:,.0f} vs "
                f"{d['rows_per_s']['single_process']:,.0f} rows/s) | {ratio:.3f} | {bar} |"
            )
    if "prefect" in results:
        lines.append(
            "| Prefect start-up, trivial flow with embedded server (s) | "
            f"{results['prefect']['trivial_flow_again']:.1f} | reported apart |"
        )
    if "memory" in results:
        for mode, m in results["memory"].items():
            sizes = [k for k in m if k.isdigit()]
            lines.append(
                f"| flow process peak RSS, labelled night of {int(sizes[0]):,} / {int(sizes[1]):,} rows, "
                f"{mode.replace('_', ' ')} (MB) | {m[sizes[0]]['peak_rss_mb']:.0f} / {m[sizes[1]]['peak_rss_mb']:.0f} "
                "| - |"
            )
            lines.append(
                f"| peak RSS difference, {mode.replace('_', ' ')} (MB) | {m['peak_difference_mb']:.0f} | <= 100 |"
            )
    if "evaluation_memory" in results:
        e = results["evaluation_memory"]
        n = e["nights"]
        lines.append(
            f"| evaluation flow peak RSS, 1 / {n} nights of {e['rows_per_night']:,} scored rows, "
            f"{e[str(n)]['label_rows']:,} label rows (MB) | {e['1']['peak_rss_mb']:.0f} / "
            f"{e[str(n)]['peak_rss_mb']:.0f} | - |"
        )
        lines.append(
            f"| evaluation peak RSS difference, {n} nights - 1 night (MB) | {e['peak_difference_mb']:.0f} | <= 150 |"
        )
    if "object_storage" in results:
        o = results["object_storage"]
        lines.append(
            f"| scoring {o['rows']:,} rows, workspace in an S3 bucket on loopback (moto) "
            f"/ local disk ({o['s3_rows_per_s']:,.0f} vs {o['local_rows_per_s']:,.0f} rows/s) "
            f"| {o['s3_to_local']:.3f} | - |"
        )
        m = o["memory"]
        sizes = [k for k in m if k.isdigit()]
        lines.append(
            f"| flow process peak RSS, labelled night of {int(sizes[0]):,} / {int(sizes[1]):,} rows, "
            f"workspace in S3 (MB) | {m[sizes[0]]['peak_rss_mb']:.0f} / {m[sizes[1]]['peak_rss_mb']:.0f} | - |"
        )
        lines.append(f"| peak RSS difference, workspace in S3 (MB) | {m['peak_difference_mb']:.0f} | <= 100 |")
    if "adbench" in results and "summary" in results["adbench"]:
        for mode, label in (
            ("product", "normal rows only"),
            ("product_labelled", "with the training split's labelled anomalies"),
        ):
            a = results["adbench"]["summary"][mode]
            knn = a["peer_mean_roc_auc"]["knn"]
            lines.append(
                f"| ADBench development sets, {label}: trained and scored | {a['scored']} of {a['datasets']} | all |"
            )
            if a["mean_roc_auc"] is not None:
                lines.append(
                    f"| the same: mean ROC-AUC, product / k-NN | {a['mean_roc_auc']:.3f} / {knn:.3f} "
                    "| product >= k-NN |"
                )
            if a["worst_gap_to_isolation_forest"] is not None:
                lines.append(
                    f"| the same: worst product ROC-AUC - IsolationForest's | {a['worst_gap_to_isolation_forest']:.3f} "
                    "| >= -0.05 |"
                )
                lines.append(
                    "| the same: median flag rate on the test split's normal rows | "
                    f"{a['median_flag_rate_normal']:.2%} | 1.5% to 3% |"
                )
    for database, load in results.get("stack_load", {}).items():
        what = (
            f"{load['runs_requested']} runs created at once, {load['readers']} readers and {load['writers']} writers "
            f"for {load['seconds_of_load']:.0f} s ({load['requests']:,} requests)"
        )
        bar = "0; all" if database == "postgresql" else "-"
        lines.append(
            f"| local stack on {database}, {what}: requests answered 5xx; runs completed | {load['server_errors']}; "
            f"{load['runs_completed']} of {load['runs_requested']} ({load['runs_created']} created) | {bar} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write bench/results/latest.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a smoke run (figures are not comparable to a full run)"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=[
            "quality",
            "others",
            "small",
            "missing",
            "categorical",
            "backfill",
            "small_files",
            "throughput",
            "dask",
            "prefect",
            "memory",
            "retrain_memory",
            "evaluation",
            "s3",
            "adbench",
            "stack",
        ],
        help="sections to leave out",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "machine": {
            "cpus": cpu_threads(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "quality": [],
    }
    scale = 0.25 if args.quick else 1.0
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        work = Path(tmp)
        workspace = Workspace.at(work / "workspace")
        # The flows run on a Prefect server of their own: nothing from the user's server or history.
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(work / "prefect-home")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        specs = [TUTORIAL] + ([] if "others" in args.skip else list(OTHERS))
        for spec in specs:
            row = quality_and_training(
                spec, work, scale, with_seed=spec is TUTORIAL and "quality" not in args.skip, log=log
            )
            default_run = row.pop("_default_run")
            if spec is TUTORIAL:
                # Nights scored below are drawn like the model's normal training rows, so about 2% are flagged,
                # as on a real night.
                rows_like = normal_class(split_rows(default_run.split)[0])
                publish_for_scoring(default_run, work / spec.name / "models" / "default.partial", workspace)
            results["quality"].append(row)
        if "small" not in args.skip:
            results["small_real_data"] = small_real_data(work, log)
        if "missing" not in args.skip:
            from bench.missing_values import missing_values

            results["missing_values"] = missing_values(work, scale, log)
        if "categorical" not in args.skip:
            from bench.categorical import categorical

            results["categorical"] = categorical(work, scale, log)
        if "backfill" not in args.skip:
            from bench.backfill import backfill

            results["backfill"] = backfill(workspace, 20_000 if args.quick else 200_000, rows_like, log)
        if "small_files" not in args.skip:
            from bench.small_files import small_files

            small, large = (20_000, 200_000) if args.quick else (200_000, 2_000_000)
            results["small_files"] = small_files(workspace, rows_like, log, small_rows=small, large_rows=large)
        if "throughput" not in args.skip:
            results["throughput"] = throughput(workspace, 200_000 if args.quick else 2_000_000, rows_like, log)
        if "dask" not in args.skip:
            results["dask"] = dask_scaling(
                workspace, 4, 100_000 if args.quick else 1_000_000, 1 if args.quick else 5, rows_like, log
            )
        if "prefect" not in args.skip:
            results["prefect"] = prefect_startup(log)
        if "memory" not in args.skip:
            results["memory"] = memory(
                workspace, (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000), rows_like, log
            )
        if "retrain_memory" not in args.skip:
            sizes = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
            results["retraining_memory"] = retraining_memory(work, sizes, 100_000, rows_like, log)
        if "evaluation" not in args.skip:
            results["evaluation_memory"] = evaluation_memory(
                workspace, 5 if args.quick else 30, 100_000 if args.quick else 1_000_000, log
            )
        if "s3" not in args.skip:
            sizes = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
            results["object_storage"] = object_storage(
                workspace, 200_000 if args.quick else 1_000_000, sizes, rows_like, log
            )
        if "adbench" not in args.skip:
            from bench.adbench import adbench

            results["adbench"] = adbench(work / "adbench", log, only=("glass", "WBC", "thyroid") if args.quick else ())
    if "stack" not in args.skip:
        from bench.stack_load import stack_load

        results["stack_load"] = stack_load(30 if args.quick else 90, 4 if args.quick else 12, 8, 2, log)
    results["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    table = render_table(results)
    stem = "quick" if args.quick else "latest"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    from bench.adbench import render as render_adbench
    from bench.categorical import render as render_categorical
    from bench.missing_values import render as render_missing

    adbench_table = render_adbench(results.get("adbench", {}))
    missing_table = render_missing(results.get("missing_values", {}))
    categorical_table = render_categorical(results.get("categorical", {}))
    header = (
        f"Benchmark ({results['mode']}, {results['started_at'][:19]}Z, {results['machine']['cpus']} CPUs, "
        f"{results['seconds']:.0f} s)"
    )
    sections = [table] + [section for section in (missing_table, categorical_table, adbench_table) if section]
    (RESULTS / f"{stem}.md").write_text(f"{header}\n\n" + "\n".join(sections))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
