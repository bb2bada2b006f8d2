"""Tasks of the retraining flow."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import storage
from data.parquet import LabelRule
from models import bundle
from models.config import AutoencoderConfig
from models.training import label_history, promotion, retraining
from tasks.common import RETRIES


@task(name="gather-label-history", cache_policy=NO_CACHE, **RETRIES)
def gather_label_history(
    workspace_root: str,
    source: str,
    labels: LabelRule,
    end_date: dt.date,
    days: int,
    id_columns: list[str],
    staging: str,
) -> dict[str, Any]:
    """Gather the rows of past nights that later labels confirmed, as extra training data."""
    history = label_history.label_history_for_training(
        workspace_root, source, labels, end_date, days, id_columns, Path(staging) / retraining.WORK_DIR
    )
    get_run_logger().info(
        "Label history %s..%s: %d confirmed normal row(s) added, %d confirmed anomalies held out, from %d night(s) "
        "with files",
        history["first_date"],
        history["last_date"],
        history["rows_confirmed_normal"],
        history["rows_confirmed_anomalous"],
        history["nights_with_files"],
    )
    return history


@task(name="split-training-data", cache_policy=NO_CACHE, **RETRIES)
def split_training_data(
    source: str,
    staging: str,
    labels: LabelRule,
    holdout_fraction: float,
    percentile: float,
    seed: int,
    label_history: str | None = None,
) -> dict[str, Any]:
    """Keep normal rows and hold out a seeded share of them for the threshold."""
    split = retraining.split_training_data(
        source, Path(staging), labels, holdout_fraction, percentile, seed, label_history=label_history
    )
    if split["scheme"] == retraining.CROSS_FIT:
        get_run_logger().info(
            "Training rows: %d normal, each also scored out of fold for the threshold (%d folds: "
            "a %d%% hold-out would leave it uncertain), %d labelled anomalies held out",
            split["rows_train"],
            split["folds"],
            round(100 * holdout_fraction),
            split["rows_holdout_anomalies"],
        )
    else:
        get_run_logger().info(
            "Training rows: %d normal for training, %d normal held out, %d labelled anomalies held out",
            split["rows_train"],
            split["rows_holdout_normal"],
            split["rows_holdout_anomalies"],
        )
    return split


@task(name="choose-recipe", cache_policy=NO_CACHE)
def choose_recipe(split: dict[str, Any], preset: str, config: dict[str, Any], staging: str) -> dict[str, Any]:
    """With labelled anomalies held out, pick the candidate recipe that ranks them best; else keep the preset's."""
    logger = get_run_logger()

    def log_candidate(row: dict[str, Any]) -> None:
        logger.info(
            "Candidate recipe %r: held-out ROC-AUC %.4f, PR-AUC %.4f (%.1f s)",
            row["recipe"],
            row["roc_auc"],
            row["pr_auc"],
            row["seconds"],
        )

    recipe = retraining.choose_recipe(
        split, preset, AutoencoderConfig.model_validate(config), Path(staging), progress=log_candidate
    )
    if recipe["candidates"]:
        logger.info("Recipe %r chosen on the %s", recipe["name"], recipe["chosen_on"])
    return recipe


@task(name="build-and-train-autoencoder", cache_policy=NO_CACHE)
def train_autoencoder(
    train_path: str, feature_names: list[str], config: dict[str, Any], staging: str
) -> dict[str, Any]:
    """Build the autoencoder from its config and train it, logging every epoch."""
    logger = get_run_logger()
    settings = AutoencoderConfig.model_validate(config)

    def log_epoch(epoch: int, logs: dict[str, float]) -> None:
        val = f", val_loss {logs['val_loss']:.5f}" if "val_loss" in logs else ""
        # Before sizing, the preset's epochs may still be 'auto'.
        logger.info("Epoch %d/%s: loss %.5f%s", epoch + 1, settings.epochs, logs.get("loss", float("nan")), val)

    history = retraining.train_model(train_path, feature_names, settings, Path(staging), progress=log_epoch)
    sized = history["config"]
    logger.info(
        "Trained %d epochs in %.1f s (best epoch %d); layers %s / %s, batch size %d, patience %s",
        history["epochs_run"],
        history["fit_seconds"],
        history["best_epoch"],
        sized["encoder_units"],
        sized["decoder_units"],
        sized["batch_size"],
        sized["early_stopping_patience"],
    )
    for attempt in history["diverged_attempts"]:
        logger.warning("A fit diverged and was trained again with safer settings: %s", attempt)
    return history


@task(name="compute-reconstruction-errors", cache_policy=NO_CACHE)
def compute_reconstruction_errors(
    staging: str, split: dict[str, Any], config: dict[str, Any], normal_errors_path: str | None = None
) -> str:
    """Score the normal rows the model did not see (held out, or out of fold) and the labelled anomalies.

    Return the path of their errors.
    """
    logger = get_run_logger()
    if split["scheme"] == retraining.CROSS_FIT:
        logger.info("Cross-fitting: %d fold models, each scoring the normal rows the others trained on", split["folds"])

    def log_fold(fold: int, folds: int) -> None:
        logger.info("Fold %d/%d scored", fold + 1, folds)

    return retraining.compute_holdout_errors(
        Path(staging), split, config, progress=log_fold, normal_errors_path=normal_errors_path
    )


@task(name="fix-threshold", cache_policy=NO_CACHE)
def fix_threshold(errors_path: str, percentile: float, scheme: str) -> dict[str, Any]:
    """Fix the threshold at the percentile of the errors of normal rows the model did not see."""
    threshold = retraining.fix_threshold_from_errors(errors_path, percentile, scheme)
    logger = get_run_logger()
    unseen = "held-out normal rows" if scheme == retraining.HOLDOUT else "normal rows scored out of fold"
    logger.info(
        "Threshold %.6g at the %gth percentile of %d %s", threshold["value"], percentile, threshold["rows"], unseen
    )
    if threshold["warning"]:
        logger.warning("Uncertain threshold: %s", threshold["warning"])
    return threshold


@task(name="save-model-bundle", cache_policy=NO_CACHE, **RETRIES)
def save_model_bundle(
    staging: str,
    version: str,
    split: dict[str, Any],
    history: dict[str, Any],
    threshold: dict[str, Any],
    preset: str,
    labels: LabelRule,
    recipe: dict[str, Any],
) -> str:
    """Write bundle.json beside the model, with the config it was trained with."""
    return str(retraining.write_bundle(Path(staging), version, split, history, threshold, preset, labels, recipe))


@task(name="write-training-report", cache_policy=NO_CACHE)
def write_training_report(
    staging: str,
    version: str,
    errors_path: str,
    history: dict[str, Any],
    threshold: dict[str, Any],
    split: dict[str, Any],
    preset: str,
    recipe: dict[str, Any],
) -> dict[str, Any]:
    """Write the training report into the staged version."""
    return retraining.write_training_report(
        Path(staging), version, errors_path, history, threshold, split, preset, recipe
    )


@task(name="publish-model-version", cache_policy=NO_CACHE)
def publish_model_version(staging: str, models_dir: str) -> str:
    """Publish the complete staging folder as its version folder in the models folder."""
    return str(retraining.publish_version(Path(staging), storage.as_path(models_dir)))


@task(name="promote-model", cache_policy=NO_CACHE)
def promote_model(models_dir: str, version: str) -> str:
    """Make a version the one scoring uses."""
    path = bundle.promote(storage.as_path(models_dir), version)
    get_run_logger().info("Model %s is now current", version)
    return str(path)


@task(name="check-promotion-gate", cache_policy=NO_CACHE)
def check_promotion_gate(
    staging: str, errors_path: str, threshold: dict[str, Any], models_dir: str, feature_names: list[str]
) -> dict[str, Any]:
    """Decide whether the new model may replace the current one."""
    decision = promotion.check_promotion(
        Path(staging), errors_path, threshold, storage.as_path(models_dir), feature_names
    )
    logger = get_run_logger()
    if decision["passed"]:
        logger.info("Promotion gate passed: %s", decision["checks"])
    else:
        logger.warning("Promotion gate refused the new model: %s", "; ".join(decision["reasons"]))
    for warning in decision["warnings"]:
        logger.warning("Promotion gate: %s", warning)
    return decision


@task(name="remove-stale-staging", cache_policy=NO_CACHE)
def remove_stale_staging(models_dir: str) -> list[str]:
    """Delete the staging folders of retraining runs that died."""
    removed = bundle.remove_stale_staging(storage.as_path(models_dir))
    if removed:
        get_run_logger().warning(
            "Removed %d staging folder(s) left by a retraining run that died: %s",
            len(removed),
            [p.name for p in removed],
        )
    return [str(p) for p in removed]
