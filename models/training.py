"""Retraining steps as plain functions over paths: split, train, errors on held-out rows, threshold, bundle, report."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import storage
from data.errors import TrainingDataError
from data.parquet import ANOMALY, NORMAL, UNLABELLED, TrainingRows, feature_matrix, read_training_rows
from models.autoencoder import build_autoencoder, reconstruction_errors, train_autoencoder
from models.bundle import BUNDLE_FILE, BUNDLE_FORMAT, MODEL_FILE, bundle_digest, library_versions, publish_bundle
from models.config import AutoencoderConfig
from models.drift import drift_reference, feature_reference, score_reference
from models.error_summary import summarize_errors
from models.reports import (
    anomaly_class_metrics,
    classification_table,
    plot_error_histogram,
    plot_loss_curves,
    render_markdown,
    write_report_files,
)
from models.runtime import keras
from models.threshold import calibration_stats, check_percentile, fix_threshold, min_holdout_rows, threshold_uncertainty, threshold_warning

WORK_DIR = "_work"
REPORT_DIR = "report"
# Fewer rows than this cannot train even the smallest network to anything but noise.
MIN_TRAINING_ROWS = 20

log = logging.getLogger(__name__)


def split_training_data(
    source: str,
    staging: Path,
    label_column: str,
    normal_label: str,
    all_rows_normal: bool,
    holdout_fraction: float,
    percentile: float,
    seed: int,
    feature_columns: Sequence[str] | None = None,
    label_history: str | None = None,
) -> dict[str, Any]:
    """Keep normal rows, hold out a seeded share for the threshold, and write both splits as Parquet in ``staging``.

    ``label_history`` is a Parquet file of past nights' rows that later labels confirmed (features and
    label): its normal rows join the training data, its anomalies the held-out anomalies.
    """
    check_percentile(percentile)
    rows = read_training_rows(source, label_column, normal_label, all_rows_normal, feature_columns)
    history_normal = history_anomalies = 0
    if label_history:
        history = read_training_rows(label_history, label_column, normal_label, False, rows.feature_names)
        history_normal = int(np.count_nonzero(history.classes == NORMAL))
        history_anomalies = int(np.count_nonzero(history.classes == ANOMALY))
        files = rows.files + history.files
        rows = TrainingRows(np.concatenate([rows.features, history.features]), np.concatenate([rows.classes, history.classes]), rows.feature_names, files, storage.files_digest(files))
    # Rows whose label is null or NaN are neither normal nor anomalous: they are counted and left out.
    normal = rows.features[rows.classes == NORMAL]
    anomalies = rows.features[rows.classes == ANOMALY]
    rows_unlabelled = int(np.count_nonzero(rows.classes == UNLABELLED))
    n_holdout = int(round(len(normal) * holdout_fraction))
    needed_holdout = min_holdout_rows(percentile)
    needed_total = max(int(np.ceil((needed_holdout - 0.5) / holdout_fraction)), int(np.ceil((MIN_TRAINING_ROWS - 0.5) / (1.0 - holdout_fraction))))
    if len(normal) == 0:
        raise TrainingDataError(f"training_data={source!r}: no rows have {label_column}={normal_label!r}; check label_column and normal_label")
    if n_holdout < needed_holdout or len(normal) - n_holdout < MIN_TRAINING_ROWS:
        raise TrainingDataError(
            f"training_data={source!r}: {len(normal)} normal rows; the {percentile:g}th percentile cannot be estimated from fewer than "
            f"{needed_holdout} held-out rows, and training needs {MIN_TRAINING_ROWS}: with holdout_fraction={holdout_fraction:g} "
            f"that is at least {needed_total} normal rows"
        )
    order = np.random.default_rng(seed).permutation(len(normal))
    holdout_idx, train_idx = order[:n_holdout], order[n_holdout:]
    work = storage.make_dir(staging / WORK_DIR)
    names = rows.feature_names
    train_path = work / "train.parquet"
    holdout_path = work / "holdout.parquet"
    _write_table(_matrix_table(normal[train_idx], names), train_path)
    holdout = np.concatenate([normal[holdout_idx], anomalies])
    is_anomaly = np.concatenate([np.zeros(n_holdout, dtype=bool), np.ones(len(anomalies), dtype=bool)])
    _write_table(_matrix_table(holdout, names, {"labelled_anomaly": pa.array(is_anomaly)}), holdout_path)
    return {
        "train_path": str(train_path),
        "holdout_path": str(holdout_path),
        "feature_names": names,
        "rows_total": int(len(rows.features)),
        "rows_train": int(len(train_idx)),
        "rows_holdout_normal": int(n_holdout),
        "rows_holdout_anomalies": int(len(anomalies)),
        "rows_unlabelled": rows_unlabelled,
        "rows_label_history_normal": history_normal,
        "rows_label_history_anomalies": history_anomalies,
        "source_files": [str(f) for f in rows.files],
        "fingerprint": rows.fingerprint,
    }


def _write_table(table: pa.Table, path: Path) -> None:
    with storage.staged_path(path) as tmp:
        pq.write_table(table, tmp)


def _matrix_table(matrix: np.ndarray, names: Sequence[str], extra: dict[str, pa.Array] | None = None) -> pa.Table:
    columns = {name: pa.array(matrix[:, j]) for j, name in enumerate(names)}
    return pa.table({**columns, **(extra or {})})


def read_matrix(source: str | Path | pa.Table, names: Sequence[str]) -> np.ndarray:
    """Return the named float columns of a Parquet file (or table) as one 2-D float64 array."""
    table = source if isinstance(source, pa.Table) else pq.read_table(source, columns=list(names))
    return feature_matrix(table, names, dtype=np.float64)


def train_model(train_path: str, feature_names: Sequence[str], config: AutoencoderConfig, staging: Path, progress: Any = None) -> dict[str, Any]:
    """Size ``config`` for the training split, build the autoencoder, train it and save it as ``staging/model.keras``.

    The returned history carries the sized config under ``config``: that is what the bundle records.
    """
    features = read_matrix(train_path, feature_names)
    sized = config.sized_for(rows=len(features), features=features.shape[1])
    started = time.perf_counter()
    model = build_autoencoder(sized, features)
    history = train_autoencoder(model, features, sized, on_epoch_end=progress)
    fit_seconds = time.perf_counter() - started
    if not np.isfinite(history.loss[-1]):
        raise TrainingDataError(f"training diverged (loss {history.loss[-1]}); lower learning_rate or check the features for extreme values")
    with storage.staged_path(staging / MODEL_FILE, suffix=".keras") as tmp:
        model.save(tmp)
    return {
        "loss": history.loss,
        "val_loss": history.val_loss,
        "epochs_run": history.epochs_run,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "fit_seconds": round(fit_seconds, 3),
        "config": sized.model_dump(),
    }


def compute_holdout_errors(staging: Path, holdout_path: str, feature_names: Sequence[str], loss: str) -> str:
    """Score the held-out rows with the staged model and write their errors beside them; return that path."""
    model = keras.saving.load_model(staging / MODEL_FILE, compile=False, safe_mode=True)
    errors = reconstruction_errors(model, read_matrix(holdout_path, feature_names), loss)
    labelled = pq.read_table(holdout_path, columns=["labelled_anomaly"]).column("labelled_anomaly")
    out = staging / WORK_DIR / "holdout-errors.parquet"
    _write_table(pa.table({"reconstruction_error": pa.array(errors), "labelled_anomaly": labelled}), out)
    return str(out)


def fix_threshold_from_errors(errors_path: str, percentile: float) -> dict[str, Any]:
    """Fix the threshold at ``percentile`` of the held-out normal rows' errors; return it with calibration statistics."""
    table = pq.read_table(errors_path)
    errors = table.column("reconstruction_error").to_numpy()
    normal = ~table.column("labelled_anomaly").to_numpy(zero_copy_only=False)
    holdout_normal = errors[normal]
    threshold = fix_threshold(holdout_normal, percentile)
    uncertainty = threshold_uncertainty(holdout_normal, percentile)
    return {
        "value": threshold,
        "percentile": float(percentile),
        "rows": int(len(holdout_normal)),
        "uncertainty": uncertainty,
        "warning": threshold_warning(uncertainty, percentile),
        "calibration": calibration_stats(holdout_normal),
        "error_reference": score_reference(holdout_normal),
    }


def write_bundle(staging: Path, version: str, split: dict[str, Any], history: dict[str, Any], threshold: dict[str, Any], preset: str, label_column: str, normal_label: str) -> Path:
    """Write bundle.json beside the staged model, with the model's checksum and everything scoring needs."""
    model_path = staging / MODEL_FILE
    config = AutoencoderConfig.model_validate(history["config"])
    payload = {
        "format_version": BUNDLE_FORMAT,
        "model_version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model_file": MODEL_FILE,
        "model_sha256": storage.content_hash(model_path),
        "features": [{"name": n, "dtype": "float64"} for n in split["feature_names"]],
        "label_column": label_column,
        "normal_label": normal_label,
        "threshold": {k: threshold[k] for k in ("value", "percentile", "rows", "uncertainty", "warning")} | {"error_measure": config.loss, "rule": "is_anomaly = reconstruction_error > value"},
        "calibration": threshold["calibration"],
        # What nightly drift is measured against: the training rows' feature deciles and the held-out errors'.
        "drift_reference": drift_reference(feature_reference(read_matrix(split["train_path"], split["feature_names"]), split["feature_names"]), threshold["error_reference"]),
        "preset": preset,
        "config": config.model_dump(),
        "seed": config.seed,
        "training": {
            "source_files": split["source_files"],
            "fingerprint_sha256": split["fingerprint"],
            "rows_total": split["rows_total"],
            "rows_train": split["rows_train"],
            "rows_holdout_normal": split["rows_holdout_normal"],
            "rows_holdout_anomalies": split["rows_holdout_anomalies"],
            "rows_unlabelled": split.get("rows_unlabelled", 0),
            "rows_label_history_normal": split.get("rows_label_history_normal", 0),
            "rows_label_history_anomalies": split.get("rows_label_history_anomalies", 0),
            "epochs_run": history["epochs_run"],
            "best_epoch": history["best_epoch"],
            "fit_seconds": history["fit_seconds"],
        },
        "library_versions": library_versions(),
    }
    payload["bundle_sha256"] = bundle_digest(payload)
    return storage.write_json(staging / BUNDLE_FILE, payload)


def write_training_report(staging: Path, version: str, errors_path: str, history: dict[str, Any], threshold: dict[str, Any], split: dict[str, Any], preset: str) -> dict[str, Any]:
    """Write the training report (loss curves, held-out error histogram, JSON, Markdown) into ``staging/report``."""
    report_dir = staging / REPORT_DIR
    table = pq.read_table(errors_path)
    errors = table.column("reconstruction_error").to_numpy()
    labelled = table.column("labelled_anomaly").to_numpy(zero_copy_only=False)
    has_anomalies = bool(labelled.any())
    classes = np.where(labelled, ANOMALY, NORMAL).astype(np.int8)
    evaluation = summarize_errors(errors, threshold["value"], threshold["percentile"], classes if has_anomalies else None)
    normal_summary = summarize_errors(errors[~labelled], threshold["value"], threshold["percentile"], None)
    loss_png = plot_loss_curves(history["loss"], history["val_loss"], report_dir / "loss-curves.png", f"Training loss, model {version}")
    hist_png = plot_error_histogram(normal_summary, report_dir / "holdout-error-histogram.png", f"Held-out normal rows, model {version}")
    report = {
        "kind": "training",
        "model_version": version,
        "preset": preset,
        "training": {k: split.get(k, 0) for k in ("rows_total", "rows_train", "rows_holdout_normal", "rows_holdout_anomalies", "rows_unlabelled", "rows_label_history_normal", "rows_label_history_anomalies", "fingerprint")},
        "history": history,
        "threshold": threshold,
        "holdout_normal": {k: normal_summary[k] for k in ("rows_scored", "rows_flagged", "flag_rate", "expected_flag_rate")},
        "holdout_evaluation": evaluation,
        "anomaly_class": anomaly_class_metrics(evaluation),
        "images": {"loss_curves": loss_png.name, "holdout_error_histogram": hist_png.name},
    }
    sections: dict[str, Any] = {
        "Training": {
            "preset": preset,
            "training rows (normal)": split["rows_train"],
            "held-out normal rows": split["rows_holdout_normal"],
            "held-out labelled anomalies": split["rows_holdout_anomalies"],
            "rows without a label (left out)": split.get("rows_unlabelled", 0),
            "normal rows of past nights confirmed by labels (in the splits above)": split.get("rows_label_history_normal", 0),
            "anomalies of past nights confirmed by labels (held out)": split.get("rows_label_history_anomalies", 0),
            "network (encoder / decoder units)": f"{history['config']['encoder_units']} / {history['config']['decoder_units']}",
            "batch size, early-stopping patience": f"{history['config']['batch_size']}, {history['config']['early_stopping_patience']}",
            "epochs run": history["epochs_run"],
            "best epoch": history["best_epoch"],
            "fit seconds": history["fit_seconds"],
        },
        "Threshold": {
            "value": threshold["value"],
            "percentile": threshold["percentile"],
            **_uncertainty_rows(threshold),
            **({"warning": threshold["warning"]} if threshold.get("warning") else {}),
            "held-out normal rows flagged": normal_summary["rows_flagged"],
            "flag rate": normal_summary["flag_rate"],
            "expected flag rate": normal_summary["expected_flag_rate"],
        },
    }
    if evaluation["labels"]:
        sections["Held-out rows, per class"] = classification_table(evaluation["labels"])
    markdown = render_markdown(f"Training report: model {version}", sections, [str(loss_png), str(hist_png)])
    write_report_files(report, markdown, report_dir, "training-report")
    return {"report": report, "markdown": markdown}


def _uncertainty_rows(threshold: dict[str, Any]) -> dict[str, Any]:
    from scipy.stats import beta

    uncertainty = threshold["uncertainty"]
    a, b = uncertainty["exceedance_rate_beta"]["a"], uncertainty["exceedance_rate_beta"]["b"]
    low, high = uncertainty["confidence_interval"]
    return {
        f"{uncertainty['confidence_level']:.0%} interval of the percentile (order statistics)": f"[{low:.6g}, {high:.6g}]",
        "rate at which normal rows exceed it": f"Beta({a}, {b}): mean {a / (a + b):.4f}, 99% range [{beta.ppf(0.005, a, b):.4f}, {beta.ppf(0.995, a, b):.4f}]",
    }


def publish_version(staging: Path, models_dir: Path | None = None) -> Path:
    """Drop the staging folder's working files and publish it as its version folder in ``models_dir`` (default: beside it)."""
    storage.remove_tree(staging / WORK_DIR)
    return publish_bundle(staging, models_dir)
