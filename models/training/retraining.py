"""Retraining steps as plain functions over paths: split, train, errors on held-out rows, threshold, bundle, report."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import storage
from data.errors import TrainingDataError
from data.parquet import (
    ANOMALY,
    NORMAL,
    UNLABELLED,
    LabelRule,
    TrainingInput,
    TrainingRows,
    feature_matrix,
    read_holdout_errors,
    read_training_rows,
)
from models.autoencoder import (
    TrainingHistory,
    build_autoencoder,
    divergence,
    gaussian_like,
    linear_dependencies,
    reconstruction_errors,
    sizing_width,
    train_autoencoder,
)
from models.bundle import BUNDLE_FILE, BUNDLE_FORMAT, MODEL_FILE, bundle_digest, library_versions, publish_bundle
from models.config import RECIPE_CANDIDATES, AutoencoderConfig
from models.evaluation.reports import (
    anomaly_class_metrics,
    classification_table,
    plot_error_histogram,
    plot_loss_curves,
    render_markdown,
    write_evaluation_report,
    write_report_files,
)
from models.monitoring.drift import drift_reference, feature_reference, score_reference
from models.monitoring.error_summary import summarize_errors
from models.runtime import keras
from models.threshold import (
    calibration_stats,
    check_percentile,
    comfortable_holdout_rows,
    fix_threshold,
    min_holdout_rows,
    threshold_uncertainty,
    threshold_warning,
)
from models.training.results import (
    ModelFit,
    RecipeChoice,
    ThresholdFit,
    TrainedModel,
    TrainingReport,
    TrainingSplit,
    as_record,
)

WORK_DIR = "_work"
REPORT_DIR = "report"
HOLDOUT_FILE = "holdout.parquet"
HOLDOUT_ERRORS_FILE = "holdout-errors.parquet"
# The gradient norm a diverged fit is clipped to when it is tried again.
SAFE_CLIP_NORM = 1.0
# Choosing a recipe by how it ranks labelled anomalies needs a few of them; on large sets the candidates
# are compared on a sample of the training rows, and the winner alone is trained on all of them.
MIN_ANOMALIES_FOR_SELECTION = 5
CONFIG_METADATA = b"anomaly.config"
SELECTION_ROWS = 20_000
# Fewer rows than this cannot train even the smallest network to anything but noise.
MIN_TRAINING_ROWS = 20

log = logging.getLogger(__name__)


# Below this many held-out normal rows the threshold is called uncertain; sets that small fix it on
# every normal row instead, through cross-fitting.
HOLDOUT, CROSS_FIT = "holdout", "cross_fit"
CROSS_FIT_FOLDS = 5


def threshold_scheme(normal_rows: int, holdout_fraction: float, percentile: float) -> str:
    """Return how the threshold's normal rows are kept from the model.

    A held-out share on large sets, cross-fitting on small ones.
    """
    return HOLDOUT if round(normal_rows * holdout_fraction) >= comfortable_holdout_rows(percentile) else CROSS_FIT


def split_training_data(
    source: str,
    staging: Path,
    labels: LabelRule,
    holdout_fraction: float,
    percentile: float,
    seed: int,
    reading: TrainingInput | None = None,
    label_history: str | None = None,
) -> TrainingSplit:
    """Keep normal rows, decide how the threshold is fixed, and write the splits as Parquet in ``staging``.

    On large sets a seeded share of the normal rows is held out (``holdout``). On sets where that share
    would leave the threshold uncertain, every normal row is trained on and counts towards the threshold
    through out-of-fold errors (``cross_fit``): ``train.parquet`` then holds every normal row, in a
    seeded order that the folds are cut from, and ``holdout.parquet`` the labelled anomalies.

    ``label_history`` is a Parquet file of past nights' rows that later labels confirmed (features and
    label): its normal rows join the training data, its anomalies the held-out anomalies.
    """
    check_percentile(percentile)
    reading = reading or TrainingInput()
    label_column, normal_label = labels.column, labels.normal
    rows = read_training_rows(
        source,
        label_column,
        normal_label,
        labels.all_rows_normal,
        missing_values=reading.missing_values,
        max_rows=reading.max_rows,
        seed=seed,
        max_categories=reading.max_categories,
    )
    history_normal = history_anomalies = 0
    if label_history:
        history = read_training_rows(
            label_history,
            label_column,
            normal_label,
            False,
            rows.feature_names,
            missing_values=reading.missing_values,
            vocabularies=rows.vocabularies,
        )
        history_normal = int(np.count_nonzero(history.classes == NORMAL))
        history_anomalies = int(np.count_nonzero(history.classes == ANOMALY))
        files = rows.files + history.files
        rows = TrainingRows(
            np.concatenate([rows.features, history.features]),
            np.concatenate([rows.classes, history.classes]),
            rows.feature_names,
            files,
            storage.files_digest(files),
            rows.ignored_columns,
            dict(Counter(rows.missing_values) + Counter(history.missing_values)),
            rows.rows_read + history.rows_read,
            rows.vocabularies,
            rows.kinds,
        )
    # Rows whose label is null or NaN are neither normal nor anomalous: they are counted and left out.
    normal = rows.features[rows.classes == NORMAL]
    anomalies = rows.features[rows.classes == ANOMALY]
    rows_unlabelled = int(np.count_nonzero(rows.classes == UNLABELLED))
    if len(normal) == 0:
        raise TrainingDataError(
            f"training_data={source!r}: no rows have {label_column}={normal_label!r}; "
            "check label_column and normal_label"
        )
    scheme = threshold_scheme(len(normal), holdout_fraction, percentile)
    # Every normal row is a held-out row once when cross-fitting; each fold's model trains on the others.
    needed = max(
        min_holdout_rows(percentile), int(np.ceil(MIN_TRAINING_ROWS * CROSS_FIT_FOLDS / (CROSS_FIT_FOLDS - 1)))
    )
    if len(normal) < needed:
        raise TrainingDataError(
            f"training_data={source!r}: {len(normal)} normal rows; the {percentile:g}th percentile cannot be estimated "
            f"from fewer than {min_holdout_rows(percentile)} normal rows, and training needs {MIN_TRAINING_ROWS}: "
            f"at least {needed} normal rows are needed"
        )
    order = np.random.default_rng(seed).permutation(len(normal))
    n_holdout = int(round(len(normal) * holdout_fraction)) if scheme == HOLDOUT else 0
    holdout_idx, train_idx = order[:n_holdout], order[n_holdout:]
    work = storage.make_dir(staging / WORK_DIR)
    names = rows.feature_names
    train_path = work / "train.parquet"
    holdout_path = work / HOLDOUT_FILE
    _write_table(_matrix_table(normal[train_idx], names), train_path)
    holdout = np.concatenate([normal[holdout_idx], anomalies])
    is_anomaly = np.concatenate([np.zeros(n_holdout, dtype=bool), np.ones(len(anomalies), dtype=bool)])
    _write_table(
        _matrix_table(holdout, names, {"labelled_anomaly": pa.array(is_anomaly, type=pa.bool_())}), holdout_path
    )
    return TrainingSplit(
        train_path=str(train_path),
        holdout_path=str(holdout_path),
        feature_names=names,
        scheme=scheme,
        folds=CROSS_FIT_FOLDS if scheme == CROSS_FIT else None,
        rows_total=int(len(rows.features)),
        rows_train=int(len(train_idx)),
        rows_holdout_normal=int(n_holdout),
        rows_threshold=int(n_holdout if scheme == HOLDOUT else len(train_idx)),
        rows_holdout_anomalies=int(len(anomalies)),
        rows_unlabelled=rows_unlabelled,
        rows_label_history_normal=history_normal,
        rows_label_history_anomalies=history_anomalies,
        source_files=[str(f) for f in rows.files],
        fingerprint=rows.fingerprint,
        ignored_columns=rows.ignored_columns,
        missing_values=reading.missing_values,
        missing_counts=rows.missing_values,
        rows_read=rows.rows_read,
        vocabularies=rows.vocabularies,
        kinds=rows.kinds,
    )


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


def safer_configs(config: AutoencoderConfig) -> list[AutoencoderConfig]:
    """Return the settings a diverged fit is tried again with.

    A tenth, then a hundredth of the learning rate, gradients clipped.
    """
    clip = min(config.gradient_clip_norm or SAFE_CLIP_NORM, SAFE_CLIP_NORM)
    return [
        config.model_copy(update={"learning_rate": config.learning_rate / factor, "gradient_clip_norm": clip})
        for factor in (10.0, 100.0)
    ]


def fit_autoencoder(
    features: np.ndarray, config: AutoencoderConfig, progress: Any = None
) -> tuple[keras.Model, TrainingHistory, AutoencoderConfig, list[dict[str, Any]]]:
    """Build and train the autoencoder; when the fit diverges, train it again with safer settings before giving up.

    Returns the model, its history, the settings it converged with and the diverged attempts before it.
    """
    diverged: list[dict[str, Any]] = []
    for attempt in [config, *safer_configs(config)]:
        model = build_autoencoder(attempt, features)
        history = train_autoencoder(model, features, attempt, on_epoch_end=progress)
        problem = divergence(history)
        if problem is None:
            # The weights early stopping kept must also reconstruct the training rows with finite errors.
            sample = features[:: max(1, len(features) // 10_000)]
            if not np.isfinite(reconstruction_errors(model, sample, attempt.loss, compiled=False)).all():
                problem = "reconstruction errors of training rows are not finite"
        if problem is None:
            return model, history, attempt, diverged
        log.warning(
            "Training diverged with learning_rate=%g, gradient_clip_norm=%s (%s); trying safer settings",
            attempt.learning_rate,
            attempt.gradient_clip_norm,
            problem,
        )
        diverged.append(
            {
                "learning_rate": attempt.learning_rate,
                "gradient_clip_norm": attempt.gradient_clip_norm,
                "problem": problem,
            }
        )
    raise TrainingDataError(
        f"training diverged {len(diverged)} times, the last with learning_rate={diverged[-1]['learning_rate']:g} "
        f"and clipped gradients ({diverged[-1]['problem']}); "
        "check the features for extreme values, or set a smaller learning_rate"
    )


def train_model(
    train_path: str, feature_names: Sequence[str], config: AutoencoderConfig, staging: Path, progress: Any = None
) -> ModelFit:
    """Size ``config`` for the training split, build the autoencoder, train it and save it as ``staging/model.keras``.

    The returned history carries the config it was trained with, sized, under ``config``: that is
    what the bundle records, and what cross-fitting trains its fold models with.
    """
    features = read_matrix(train_path, feature_names)
    if not config.scale_inputs and np.isnan(features).any():
        raise TrainingDataError(
            f"{train_path}: training rows have missing values, and a recipe that does not scale its inputs "
            "(scale_inputs=False, as the seed preset) cannot fill them in; use the default preset, or fill the gaps"
        )
    sized = sized_for_data(config, features)
    started = time.perf_counter()
    model, history, trained, diverged = fit_autoencoder(features, sized, progress)
    fit_seconds = time.perf_counter() - started
    with storage.staged_path(staging / MODEL_FILE, suffix=".keras") as tmp:
        model.save(tmp)
    return ModelFit(
        loss=history.loss,
        val_loss=history.val_loss,
        epochs_run=history.epochs_run,
        best_epoch=history.best_epoch,
        stopped_early=history.stopped_early,
        fit_seconds=round(fit_seconds, 3),
        diverged_attempts=diverged,
        config=trained,
    )


def sized_for_data(config: AutoencoderConfig, features: np.ndarray) -> AutoencoderConfig:
    """Return ``config`` with every 'auto' setting decided for these training rows.

    Widths count a categorical feature as the bits its slots need (see ``sizing_width``); the shape of the data is
    judged on the numeric features.
    """
    numeric = np.delete(features, [j for j, _ in config.categorical_columns], axis=1)
    return config.sized_for(
        rows=len(features),
        features=sizing_width(features.shape[1], config.categorical_columns),
        linear_dependencies=linear_dependencies(numeric) if numeric.shape[1] else 0,
        gaussian_like=gaussian_like(numeric) if numeric.shape[1] else False,
    )


def out_of_fold_errors(
    features: np.ndarray, config: AutoencoderConfig, folds: int, progress: Any = None, unseen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's out-of-fold reconstruction error, and the fold models' mean error on ``unseen`` rows.

    Each row's error comes from a model trained on the other folds.

    Fold k holds every row i with i % folds == k. The rows come in a seeded random order, so the
    folds are random; interleaved, any half of the errors holds rows of every fold model alike.
    """
    errors = np.empty(len(features), dtype=np.float64)
    unseen_errors = np.zeros(0 if unseen is None else len(unseen), dtype=np.float64)
    for k in range(folds):
        held = np.arange(k, len(features), folds)
        kept = np.ones(len(features), dtype=bool)
        kept[held] = False
        model, _, trained, _ = fit_autoencoder(features[kept], config)
        errors[held] = reconstruction_errors(model, features[held], trained.loss, compiled=False)
        if unseen is not None:
            unseen_errors += reconstruction_errors(model, unseen, trained.loss, compiled=False) / folds
        if progress is not None:
            progress(k, folds)
    return errors, unseen_errors


def heldout_ranking(normal_errors: np.ndarray, anomaly_errors: np.ndarray) -> dict[str, float]:
    """Return how well errors rank labelled anomalies above unseen normal rows: ROC-AUC and PR-AUC."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.r_[np.zeros(len(normal_errors), dtype=bool), np.ones(len(anomaly_errors), dtype=bool)]
    scores = np.r_[normal_errors, anomaly_errors]
    return {"roc_auc": float(roc_auc_score(truth, scores)), "pr_auc": float(average_precision_score(truth, scores))}


def selection_rows(train: np.ndarray, scheme: str, seed: int) -> np.ndarray:
    """Return the training rows candidates are compared on: a seeded sample of SELECTION_ROWS when held out."""
    if scheme == HOLDOUT and len(train) > SELECTION_ROWS:
        return train[np.random.default_rng(seed).choice(len(train), SELECTION_ROWS, replace=False)]
    return train


def candidate_errors(
    train: np.ndarray, held: np.ndarray, labelled: np.ndarray, scheme: str, folds: int, sized: AutoencoderConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Return the errors of unseen normal rows and of the labelled anomalies under one sized candidate recipe.

    Held out: a model trained on ``train`` (the selection rows) scores the held-out rows.
    Cross-fitted: the out-of-fold errors of the normal rows, and the fold models' mean error on each anomaly.
    """
    if scheme == HOLDOUT:
        model, _, trained, _ = fit_autoencoder(train, sized)
        errors = reconstruction_errors(model, held, trained.loss, compiled=False)
        return errors[~labelled], errors[labelled]
    return out_of_fold_errors(train, sized, folds, unseen=held[labelled])


def choose_recipe(
    split: TrainingSplit, preset: str, config: AutoencoderConfig, staging: Path, progress: Any = None
) -> RecipeChoice:
    """Pick, among the preset's candidate recipes, the one that ranks the held-out labelled anomalies best.

    Without enough labelled anomalies (or for a preset without candidates) the preset's own recipe is
    kept. When cross-fitting, the winner's out-of-fold errors are kept for the threshold, which is then
    fixed on exactly the errors the choice was made on.
    """
    # Every candidate one-hot encodes the categorical features.
    config = config.model_copy(update={"categorical_columns": split.categorical_columns()})
    candidates = RECIPE_CANDIDATES.get(preset, {})
    anomalies = split.rows_holdout_anomalies
    if not candidates or anomalies < MIN_ANOMALIES_FOR_SELECTION:
        why = (
            f"{anomalies} labelled anomalies held out; "
            f"at least {MIN_ANOMALIES_FOR_SELECTION} choose among candidate recipes"
            if candidates
            else f"preset {preset!r} has no candidate recipes"
        )
        return RecipeChoice.preset(next(iter(candidates), preset), config, note=why)
    names = split.feature_names
    train = read_matrix(split.train_path, names)
    holdout = pq.read_table(split.holdout_path)
    labelled = holdout.column("labelled_anomaly").to_numpy(zero_copy_only=False)
    held = read_matrix(holdout, names)
    table = []
    errors: dict[str, tuple[np.ndarray, AutoencoderConfig]] = {}
    sample = selection_rows(train, split.scheme, config.seed)
    for name, changes in candidates.items():
        candidate = config.model_copy(update=changes)
        sized = sized_for_data(candidate, sample)
        # Where the preset sizes itself into another candidate (it whitens Gaussian-like data), training that
        # candidate again would only repeat the same ranking.
        same = next((earlier for earlier, (_, settings) in errors.items() if settings == sized), None)
        if same is not None:
            row = next(r for r in table if r["recipe"] == same)
            table.append({**row, "recipe": name, "seconds": 0.0, "changes": changes, "same_as": same})
            continue
        started = time.perf_counter()
        normal, anomaly = candidate_errors(sample, held, labelled, split.scheme, split.folds, sized)
        errors[name] = (normal, sized)
        table.append(
            {
                "recipe": name,
                **heldout_ranking(normal, anomaly),
                "seconds": round(time.perf_counter() - started, 3),
                "changes": changes,
            }
        )
        if progress is not None:
            progress(table[-1])
    best = max(table, key=lambda row: row["roc_auc"])  # the first of equals: the preset's own recipe comes first
    for row in table:
        row["chosen"] = row is best
    normal_errors_path = None
    if split.scheme == CROSS_FIT:
        normal_errors_path = staging / WORK_DIR / "chosen-normal-errors.parquet"
        # Stamped with the settings they were computed with: the threshold reuses them only for a model
        # trained with the same.
        normal, chosen = errors[best["recipe"]]
        table_ = pa.table({"reconstruction_error": pa.array(normal)}).replace_schema_metadata(
            {CONFIG_METADATA: chosen.model_dump_json()}
        )
        _write_table(table_, normal_errors_path)
    rows = "held-out normal rows" if split.scheme == HOLDOUT else "normal rows out of fold"
    return RecipeChoice(
        name=best["recipe"],
        config=config.model_copy(update=candidates[best["recipe"]]),
        chosen_on=f"ROC-AUC of {anomalies} labelled anomalies against the {rows}",
        candidates=table,
        note=None,
        normal_errors_path=str(normal_errors_path) if normal_errors_path else None,
    )


def compute_holdout_errors(
    staging: Path,
    split: TrainingSplit,
    config: AutoencoderConfig,
    progress: Any = None,
    normal_errors_path: str | None = None,
) -> str:
    """Write the errors of unseen normal rows and of the labelled anomalies; return that path.

    Each normal row is scored by a model that did not see it.

    Held out (``holdout``): the staged model scores the held-out rows. Cross-fitted (``cross_fit``):
    each normal row is scored by a model of the same settings trained on the other folds, and the
    anomalies, never trained on, by the staged model. ``normal_errors_path`` holds out-of-fold errors
    already computed with these settings (by :func:`choose_recipe`), which are then not computed again.
    """
    names = split.feature_names
    sized = config
    model = keras.saving.load_model(staging / MODEL_FILE, compile=False, safe_mode=True)
    holdout = pq.read_table(split.holdout_path)
    labelled = holdout.column("labelled_anomaly").to_numpy(zero_copy_only=False)
    errors = reconstruction_errors(model, read_matrix(holdout, names), sized.loss)
    if split.scheme == CROSS_FIT:
        known = pq.read_table(normal_errors_path) if normal_errors_path else None
        # Only errors of exactly these settings will do: a final fit that diverged was trained with safer ones.
        if known is not None and (known.schema.metadata or {}).get(CONFIG_METADATA) == sized.model_dump_json().encode():
            normal = known.column("reconstruction_error").to_numpy()
        else:
            normal, _ = out_of_fold_errors(read_matrix(split.train_path, names), sized, split.folds, progress)
        errors = np.concatenate([normal, errors])
        labelled = np.concatenate([np.zeros(len(normal), dtype=bool), labelled])
    out = staging / WORK_DIR / HOLDOUT_ERRORS_FILE
    _write_table(
        pa.table({"reconstruction_error": pa.array(errors), "labelled_anomaly": pa.array(labelled, type=pa.bool_())}),
        out,
    )
    return str(out)


def fix_threshold_from_errors(errors_path: str, percentile: float, scheme: str = HOLDOUT) -> ThresholdFit:
    """Fix the threshold at ``percentile`` of the errors of unseen normal rows; return it with calibration statistics.

    The errors are those of normal rows their model did not see.
    """
    errors, labelled = read_holdout_errors(errors_path)
    holdout_normal = errors[~labelled]
    threshold = fix_threshold(holdout_normal, percentile)
    uncertainty = threshold_uncertainty(holdout_normal, percentile)
    return ThresholdFit(
        value=threshold,
        percentile=float(percentile),
        rows=int(len(holdout_normal)),
        uncertainty=uncertainty,
        warning=threshold_warning(
            uncertainty, percentile, "held-out normal rows" if scheme == HOLDOUT else "normal rows scored out of fold"
        ),
        calibration=calibration_stats(holdout_normal),
        error_reference=score_reference(holdout_normal),
    )


def write_bundle(staging: Path, trained: TrainedModel) -> Path:
    """Write bundle.json beside the staged model, with the model's checksum and everything scoring needs."""
    split, fit, threshold, config = trained.split, trained.fit, trained.threshold, trained.fit.config
    model_path = staging / MODEL_FILE
    payload = {
        "format_version": BUNDLE_FORMAT,
        "model_version": trained.version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model_file": MODEL_FILE,
        "model_sha256": storage.content_hash(model_path),
        "features": [_feature_record(name, split) for name in split.feature_names],
        # Scoring fills a missing value inside the model only where the model learnt to, and quarantines it otherwise.
        "missing_values": split.missing_values,
        "label_column": trained.labels.column,
        "normal_label": trained.labels.normal,
        "threshold": {k: getattr(threshold, k) for k in ("value", "percentile", "rows", "uncertainty", "warning")}
        | {
            "error_measure": config.loss,
            "rule": "is_anomaly = reconstruction_error > value",
            "scheme": split.scheme,
            "folds": split.folds,
        },
        "calibration": threshold.calibration,
        # What nightly drift is measured against: the training rows' feature deciles and the held-out errors'.
        "drift_reference": drift_reference(
            feature_reference(
                read_matrix(split.train_path, split.feature_names),
                split.feature_names,
                categorical=split.vocabularies,
            ),
            threshold.error_reference,
        ),
        "preset": trained.preset,
        "recipe": trained.recipe.record(),
        "config": config.model_dump(),
        "seed": config.seed,
        "training": {
            "source_files": split.source_files,
            "fingerprint_sha256": split.fingerprint,
            "ignored_columns": split.ignored_columns,
            "missing_values_filled": split.missing_counts,
            **{name: getattr(split, name) for name in BUNDLE_ROW_COUNTS},
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "fit_seconds": fit.fit_seconds,
            "diverged_attempts": fit.diverged_attempts,
        },
        "library_versions": library_versions(),
    }
    payload["bundle_sha256"] = bundle_digest(payload)
    return storage.write_json(staging / BUNDLE_FILE, payload)


def _feature_record(name: str, split: TrainingSplit) -> dict[str, Any]:
    kind = split.kinds.get(name, "numeric")
    if kind == "categorical":
        return {"name": name, "dtype": "string", "kind": kind, "vocabulary": split.vocabularies[name]}
    return {"name": name, "dtype": "float64", "kind": kind}


BUNDLE_ROW_COUNTS = (
    "rows_read", "rows_total", "rows_train", "rows_holdout_normal", "rows_threshold", "rows_holdout_anomalies",
    "rows_unlabelled", "rows_label_history_normal", "rows_label_history_anomalies",
)  # fmt: skip


def write_training_report(staging: Path, trained: TrainedModel) -> TrainingReport:
    """Write the training report (loss curves, held-out error histogram, JSON, Markdown) into ``staging/report``.

    Beside it goes the held-out evaluation report: every held-out row, normal and labelled anomaly, by class.
    """
    version, split, fit, threshold, recipe = (
        trained.version,
        trained.split,
        trained.fit,
        trained.threshold,
        trained.recipe,
    )
    report_dir = staging / REPORT_DIR
    errors, labelled = read_holdout_errors(trained.errors_path)
    has_anomalies = bool(labelled.any())
    classes = np.where(labelled, ANOMALY, NORMAL).astype(np.int8)
    evaluation = summarize_errors(errors, threshold.value, threshold.percentile, classes if has_anomalies else None)
    normal_summary = summarize_errors(errors[~labelled], threshold.value, threshold.percentile, None)
    loss_png = plot_loss_curves(
        fit.loss, fit.val_loss, report_dir / "loss-curves.png", f"Training loss, model {version}"
    )
    unseen = "Held-out normal rows" if split.scheme == HOLDOUT else f"Normal rows out of fold ({split.folds} folds)"
    hist_png = plot_error_histogram(
        normal_summary, report_dir / "holdout-error-histogram.png", f"{unseen}, model {version}"
    )
    report = {
        "kind": "training",
        "model_version": version,
        "preset": trained.preset,
        "recipe": recipe.record(),
        "training": split.figures(),
        "history": as_record(fit),
        "threshold": as_record(threshold),
        "holdout_normal": {
            k: normal_summary[k] for k in ("rows_scored", "rows_flagged", "flag_rate", "expected_flag_rate")
        },
        "holdout_evaluation": evaluation,
        "anomaly_class": anomaly_class_metrics(evaluation),
        "images": {"loss_curves": loss_png.name, "holdout_error_histogram": hist_png.name},
    }
    sections: dict[str, Any] = {
        "Training": {
            "preset": trained.preset,
            "training rows (normal)": split.rows_train,
            "held-out normal rows": split.rows_holdout_normal,
            "threshold fixed on": _threshold_rows_text(split),
            "held-out labelled anomalies": split.rows_holdout_anomalies,
            "rows without a label (left out)": split.rows_unlabelled,
            "rows read (a seeded sample of max_training_rows is kept when more)": split.rows_read,
            "columns that are not features": _by_column_text(split.ignored_columns),
            "missing values filled in (by feature)": _by_column_text(split.missing_counts),
            "normal rows of past nights confirmed by labels (in the splits above)": split.rows_label_history_normal,
            "anomalies of past nights confirmed by labels (held out)": split.rows_label_history_anomalies,
            "network (encoder / decoder units)": f"{fit.config.encoder_units} / {fit.config.decoder_units}",
            "batch size, early-stopping patience": f"{fit.config.batch_size}, {fit.config.early_stopping_patience}",
            "epochs run": fit.epochs_run,
            "best epoch": fit.best_epoch,
            "fit seconds": fit.fit_seconds,
            "fits that diverged and were trained again": len(fit.diverged_attempts),
        },
        "Threshold": {
            "value": threshold.value,
            "percentile": threshold.percentile,
            **_uncertainty_rows(threshold),
            **({"warning": threshold.warning} if threshold.warning else {}),
            "held-out normal rows flagged": normal_summary["rows_flagged"],
            "flag rate": normal_summary["flag_rate"],
            "expected flag rate": normal_summary["expected_flag_rate"],
        },
    }
    if recipe.candidates:
        sections[f"Recipe chosen on the {recipe.chosen_on}"] = [
            {
                "recipe": row["recipe"],
                "ROC-AUC": row["roc_auc"],
                "PR-AUC": row["pr_auc"],
                "seconds": row["seconds"] if "same_as" not in row else f"0 (the same settings as {row['same_as']})",
                "chosen": "yes" if row["chosen"] else "",
            }
            for row in recipe.candidates
        ]
    else:
        sections["Training"]["recipe"] = f"{recipe.name} ({recipe.note})" if recipe.note else recipe.name
    if evaluation["labels"]:
        sections["Held-out rows, per class"] = classification_table(evaluation["labels"])
    markdown = render_markdown(f"Training report: model {version}", sections, [str(loss_png), str(hist_png)])
    write_report_files(report, markdown, report_dir, "training-report")
    write_evaluation_report(
        evaluation,
        report_dir,
        "holdout-evaluation",
        f"Held-out evaluation, model {version}",
        {"model_version": version, "rows": "held-out normal rows and labelled anomalies"},
    )
    return TrainingReport(report=report, markdown=markdown)


def _by_column_text(by_column: dict[str, Any]) -> str:
    return "; ".join(f"{name} ({value})" for name, value in by_column.items()) or "none"


def _threshold_rows_text(split: TrainingSplit) -> str:
    if split.scheme == HOLDOUT:
        return f"{split.rows_threshold} held-out normal rows"
    return (
        f"all {split.rows_threshold} normal rows, each scored by a model trained on the other {split.folds - 1} "
        f"of {split.folds} folds"
    )


def _uncertainty_rows(threshold: ThresholdFit) -> dict[str, Any]:
    from scipy.stats import beta

    uncertainty = threshold.uncertainty
    a, b = uncertainty["exceedance_rate_beta"]["a"], uncertainty["exceedance_rate_beta"]["b"]
    low, high = uncertainty["confidence_interval"]
    return {
        f"{uncertainty['confidence_level']:.0%} interval of the percentile (order statistics)": (
            f"[{low:.6g}, {high:.6g}]"
        ),
        "rate at which normal rows exceed it": (
            f"Beta({a}, {b}): mean {a / (a + b):.4f}, 99% range [{beta.ppf(0.005, a, b):.4f}, "
            f"{beta.ppf(0.995, a, b):.4f}]"
        ),
    }


def publish_version(staging: Path, models_dir: Path | None = None) -> Path:
    """Drop the staging folder's working files and publish it as its version folder in ``models_dir``.

    Without ``models_dir``, the version folder goes beside the staging folder.
    """
    storage.remove_tree(staging / WORK_DIR)
    return publish_bundle(staging, models_dir)
