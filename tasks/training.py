"""Tasks of the retraining flow."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import storage
from data.parquet import FILL_MISSING, LabelRule, MissingValues, TrainingInput
from models import bundle
from models.config import AutoencoderConfig
from models.training import label_history, promotion, retraining
from models.training.results import (
    ConfirmedRows,
    ModelFit,
    PromotionDecision,
    RecipeChoice,
    ThresholdFit,
    TrainedModel,
    TrainingReport,
    TrainingSplit,
)
from tasks.common import RETRIES


@task(name="gather-label-history", cache_policy=NO_CACHE, **RETRIES)
def gather_label_history(
    workspace_root: str,
    source: str,
    labels: LabelRule,
    days: int,
    id_columns: list[str],
    staging: str,
    missing_values: MissingValues = FILL_MISSING,
) -> ConfirmedRows:
    """Gather the rows of the ``days`` nights up to today (UTC) that later labels confirmed, as extra training data."""
    today = dt.datetime.now(dt.UTC).date()
    history = label_history.label_history_for_training(
        workspace_root, source, labels, today, days, id_columns, Path(staging) / retraining.WORK_DIR, missing_values
    )
    get_run_logger().info(
        "Label history %s..%s: %d confirmed normal row(s) added, %d confirmed anomalies held out, from %d night(s) "
        "with files",
        history.first_date,
        history.last_date,
        history.rows_confirmed_normal,
        history.rows_confirmed_anomalous,
        history.nights_with_files,
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
    reading: TrainingInput,
    label_history: str | None = None,
) -> TrainingSplit:
    """Keep normal rows and hold out a seeded share of them for the threshold."""
    split = retraining.split_training_data(
        source, Path(staging), labels, holdout_fraction, percentile, seed, reading, label_history
    )
    logger = get_run_logger()
    if split.rows_read > split.rows_total:
        logger.info("Training rows: a seeded sample of %d of the %d rows read", split.rows_total, split.rows_read)
    # A column of data the model might have used, not one the user named as a label or an id, is worth a warning.
    left_out = {
        name: why
        for name, why in split.ignored_columns.items()
        if why not in ("label", "identifier", "not among feature_columns")
    }
    if left_out:
        logger.warning("Columns left out of the features: %s", left_out)
    kinds = {name: split.kinds.get(name, "numeric") for name in split.feature_names}
    logger.info("Features (with their kind): %s; other columns: %s", kinds, split.ignored_columns)
    if split.vocabularies:
        logger.info(
            "Categorical features, one-hot encoded in the model (values): %s",
            {name: len(values) for name, values in split.vocabularies.items()},
        )
    if split.missing_counts:
        logger.info("Missing values, filled in by the model (by feature): %s", split.missing_counts)
    if split.scheme == retraining.CROSS_FIT:
        logger.info(
            "Training rows: %d normal, each also scored out of fold for the threshold (%d folds: "
            "a %d%% hold-out would leave it uncertain), %d labelled anomalies held out",
            split.rows_train,
            split.folds,
            round(100 * holdout_fraction),
            split.rows_holdout_anomalies,
        )
    else:
        logger.info(
            "Training rows: %d normal for training, %d normal held out, %d labelled anomalies held out",
            split.rows_train,
            split.rows_holdout_normal,
            split.rows_holdout_anomalies,
        )
    return split


@task(name="choose-recipe", cache_policy=NO_CACHE)
def choose_recipe(split: TrainingSplit, preset: str, config: AutoencoderConfig, staging: str) -> RecipeChoice:
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

    recipe = retraining.choose_recipe(split, preset, config, Path(staging), progress=log_candidate)
    if recipe.candidates:
        logger.info("Recipe %r chosen on the %s", recipe.name, recipe.chosen_on)
    return recipe


@task(name="build-and-train-autoencoder", cache_policy=NO_CACHE)
def train_autoencoder(split: TrainingSplit, config: AutoencoderConfig, staging: str) -> ModelFit:
    """Build the autoencoder from its config and train it on the split's training rows, logging every epoch."""
    logger = get_run_logger()

    def log_epoch(epoch: int, logs: dict[str, float]) -> None:
        val = f", val_loss {logs['val_loss']:.5f}" if "val_loss" in logs else ""
        # Before sizing, the preset's epochs may still be 'auto'.
        logger.info("Epoch %d/%s: loss %.5f%s", epoch + 1, config.epochs, logs.get("loss", float("nan")), val)

    fit = retraining.train_model(split.train_path, split.feature_names, config, Path(staging), progress=log_epoch)
    sized = fit.config
    logger.info(
        "Trained %d epochs in %.1f s (best epoch %d); layers %s / %s, batch size %d, patience %s",
        fit.epochs_run,
        fit.fit_seconds,
        fit.best_epoch,
        sized.encoder_units,
        sized.decoder_units,
        sized.batch_size,
        sized.early_stopping_patience,
    )
    for attempt in fit.diverged_attempts:
        logger.warning("A fit diverged and was trained again with safer settings: %s", attempt)
    return fit


@task(name="compute-reconstruction-errors", cache_policy=NO_CACHE)
def compute_reconstruction_errors(staging: str, split: TrainingSplit, fit: ModelFit, recipe: RecipeChoice) -> str:
    """Score the normal rows the model did not see (held out, or out of fold) and the labelled anomalies.

    Return the path of their errors.
    """
    logger = get_run_logger()
    if split.scheme == retraining.CROSS_FIT:
        logger.info("Cross-fitting: %d fold models, each scoring the normal rows the others trained on", split.folds)

    def log_fold(fold: int, folds: int) -> None:
        logger.info("Fold %d/%d scored", fold + 1, folds)

    return retraining.compute_holdout_errors(
        Path(staging), split, fit.config, progress=log_fold, normal_errors_path=recipe.normal_errors_path
    )


@task(name="fix-threshold", cache_policy=NO_CACHE)
def fix_threshold(errors_path: str, percentile: float, scheme: str) -> ThresholdFit:
    """Fix the threshold at the percentile of the errors of normal rows the model did not see."""
    threshold = retraining.fix_threshold_from_errors(errors_path, percentile, scheme)
    logger = get_run_logger()
    unseen = "held-out normal rows" if scheme == retraining.HOLDOUT else "normal rows scored out of fold"
    logger.info("Threshold %.6g at the %gth percentile of %d %s", threshold.value, percentile, threshold.rows, unseen)
    if threshold.warning:
        logger.warning("Uncertain threshold: %s", threshold.warning)
    return threshold


@task(name="save-model-bundle", cache_policy=NO_CACHE, **RETRIES)
def save_model_bundle(staging: str, trained: TrainedModel) -> str:
    """Write bundle.json beside the model, with the config it was trained with."""
    return str(retraining.write_bundle(Path(staging), trained))


@task(name="write-training-report", cache_policy=NO_CACHE, **RETRIES)
def write_training_report(staging: str, trained: TrainedModel) -> TrainingReport:
    """Write the training report and the held-out evaluation report into the staged version."""
    return retraining.write_training_report(Path(staging), trained)


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
def check_promotion_gate(staging: str, trained: TrainedModel, models_dir: str) -> PromotionDecision:
    """Decide whether the new model may replace the current one."""
    decision = promotion.check_promotion(
        Path(staging),
        trained.errors_path,
        trained.split.holdout_path,
        trained.threshold.value,
        trained.threshold.percentile,
        storage.as_path(models_dir),
        trained.split.feature_names,
    )
    logger = get_run_logger()
    if decision.passed:
        logger.info("Promotion gate passed: %s", decision.checks)
    else:
        logger.warning("Promotion gate refused the new model: %s", "; ".join(decision.reasons))
    for warning in decision.warnings:
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
