"""Retraining flow: fit the autoencoder on normal rows and fix the threshold on held-out normal rows."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from data import storage
from data.locks import retraining_lock
from data.parquet import (
    DEFAULT_MAX_CATEGORIES,
    DEFAULT_MAX_TRAINING_ROWS,
    FILL_MISSING,
    LabelRule,
    MissingValues,
    TrainingInput,
)
from data.workspace import Workspace, default_workspace
from models.bundle import current_version, discarded_on_failure, new_version, promote_command, staging_dir
from models.config import PresetName, resolve_preset
from models.training.outcome import RetrainingRun
from models.training.results import PromotionDecision, TrainedModel
from tasks.events import emit_model_event
from tasks.reporting import publish_report_artifacts
from tasks.training import (
    check_promotion_gate,
    choose_recipe,
    compute_reconstruction_errors,
    fix_threshold,
    gather_label_history,
    promote_model,
    publish_model_version,
    remove_stale_staging,
    save_model_bundle,
    split_training_data,
    train_autoencoder,
    write_training_report,
)


@flow(name="retrain-autoencoder", flow_run_name="retrain-{preset}-p{percentile}", timeout_seconds=6 * 3600)
def retrain_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    training_data: Annotated[str | None, Field(json_schema_extra={"title": "Training data"})] = None,
    preset: Annotated[PresetName, Field(json_schema_extra={"title": "Preset"})] = "default",
    percentile: Annotated[float, Field(gt=0, lt=100, json_schema_extra={"title": "Threshold percentile"})] = 98.0,
    label_column: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Label column"})] = "label",
    normal_label: Annotated[str, Field(json_schema_extra={"title": "Normal label value"})] = "0",
    all_rows_normal: Annotated[bool, Field(json_schema_extra={"title": "All rows are normal"})] = False,
    missing_values: Annotated[MissingValues, Field(json_schema_extra={"title": "Missing values"})] = FILL_MISSING,
    max_training_rows: Annotated[
        int, Field(ge=1000, json_schema_extra={"title": "Most training rows read"})
    ] = DEFAULT_MAX_TRAINING_ROWS,
    max_categories: Annotated[
        int, Field(ge=1, le=10_000, json_schema_extra={"title": "Most values of a categorical feature"})
    ] = DEFAULT_MAX_CATEGORIES,
    holdout_fraction: Annotated[float, Field(gt=0, lt=1, json_schema_extra={"title": "Hold-out fraction"})] = 0.2,
    epochs: Annotated[
        Annotated[int, Field(ge=1, le=10_000)] | None, Field(json_schema_extra={"title": "Epochs"})
    ] = None,
    batch_size: Annotated[Annotated[int, Field(ge=1)] | None, Field(json_schema_extra={"title": "Batch size"})] = None,
    learning_rate: Annotated[
        Annotated[float, Field(gt=0, le=1)] | None, Field(json_schema_extra={"title": "Learning rate"})
    ] = None,
    seed: Annotated[
        Annotated[int, Field(ge=0, le=4_294_967_295)] | None, Field(json_schema_extra={"title": "Random seed"})
    ] = None,
    promote: Annotated[bool, Field(json_schema_extra={"title": "Promote the new model"})] = True,
    use_label_history: Annotated[bool, Field(json_schema_extra={"title": "Learn from labelled past nights"})] = False,
    label_history_days: Annotated[
        int, Field(ge=1, le=3660, json_schema_extra={"title": "Days of labelled nights"})
    ] = 30,
    id_columns: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, json_schema_extra={"title": "Id columns of the labels"}),
    ] = ["row_id"],  # noqa: B006 - Prefect copies parameters
) -> dict[str, Any]:
    """Retrain the autoencoder on normal-labelled rows and fix the anomaly threshold on held-out normal rows.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/);
            the default comes from $ANOMALY_WORKSPACE, else ./workspace.
        training_data: Training Parquet: a file, a folder or a glob. Empty or not given means the workspace's
            training/ folder.
        preset: Named model recipe: 'default' (works on standardised data) or 'seed'
            (the tutorial's recipe, for reproducing it).
        percentile: Percentile of held-out normal rows' reconstruction error that becomes the threshold
            (98 flags about 2% of normal rows).
        label_column: Column holding the class label in the training data.
        normal_label: Value of the label column that marks a normal row (compared as text, e.g. '0').
        all_rows_normal: Set when the training data has no label column and every row is normal.
        missing_values: 'fill': a missing (null or NaN) feature value is filled in inside the model, which also
            sees that it is missing, so the row is trained on and, at night, scored; 'quarantine': training
            refuses such rows and scoring quarantines them.
        max_training_rows: Training files holding more rows than this are read as a seeded uniform sample of
            this many rows (labelled anomalies and hold-out included), streamed, so memory holds only the sample.
        max_categories: A text (string or category) column whose training rows hold at most this many distinct
            values becomes a categorical feature, one-hot encoded inside the model; one with more is left out
            (see ignored_columns).
        holdout_fraction: Share of normal rows held out from training to fix the threshold.
        epochs: Override the preset's maximum number of epochs.
        batch_size: Override the preset's training batch size.
        learning_rate: Override the preset's learning rate.
        seed: Override the preset's random seed (weights, shuffling, hold-out split).
        promote: Make the new model current (the one nightly scoring uses) if its promotion gate passes;
            off, the version is only saved.
        use_label_history: Also train on rows of past nights (incoming/) that labels in labels/ confirm normal,
            and test on those they confirm anomalous.
        label_history_days: How many nights, ending today (UTC), the label history reaches back.
        id_columns: Columns that identify a row in both the label files and the nights' files.
    """
    logger = get_run_logger()
    ws = Workspace.at(workspace)
    config = resolve_preset(preset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    source = training_data or str(ws.training_dir)
    labels = LabelRule(column=label_column, normal=normal_label, all_rows_normal=all_rows_normal)
    models_dir = str(ws.models_dir)

    # One retraining at a time per workspace: versions, staging folders and current.json are shared.
    with retraining_lock(ws):
        remove_stale_staging(models_dir=models_dir)
        version = new_version()
        staging = str(staging_dir(ws.models_dir, version))
        logger.info("Retraining model %s with preset %r from %s", version, preset, source)
        # Everything is built in the staging folder, which a failed step takes with it.
        with discarded_on_failure(staging):
            confirmed = None
            if use_label_history:
                confirmed = gather_label_history(
                    workspace_root=str(ws.root),
                    source=source,
                    labels=labels,
                    days=label_history_days,
                    id_columns=list(id_columns),
                    staging=staging,
                    missing_values=missing_values,
                )
            # Normal rows only, a seeded share held out for the threshold (or all of them cross-fitted).
            split = split_training_data(
                source=source,
                staging=staging,
                labels=labels,
                holdout_fraction=holdout_fraction,
                percentile=percentile,
                seed=config.seed,
                reading=TrainingInput(
                    missing_values=missing_values, max_rows=max_training_rows, max_categories=max_categories
                ),
                label_history=confirmed.path if confirmed else None,
            )
            # With labelled anomalies held out, the candidate recipe that ranks them best; then train it.
            recipe = choose_recipe(split=split, preset=preset, config=config, staging=staging)
            fit = train_autoencoder(split=split, config=recipe.config, staging=staging)
            # The threshold is the percentile of errors on normal rows the model did not see (held out, or out of fold).
            errors_path = compute_reconstruction_errors(staging=staging, split=split, fit=fit, recipe=recipe)
            threshold = fix_threshold(errors_path=errors_path, percentile=percentile, scheme=split.scheme)
            trained = TrainedModel(version, preset, labels, split, recipe, fit, threshold, errors_path)
            save_model_bundle(staging=staging, trained=trained)
            report = write_training_report(staging=staging, trained=trained)
            gate = check_promotion_gate(staging=staging, trained=trained, models_dir=models_dir)
            # A rename, or uploads with bundle.json last.
            version_dir = publish_model_version(staging=staging, models_dir=models_dir)
        current = _promote_if_allowed(models_dir=models_dir, version=version, gate=gate, promote=promote)

    run = RetrainingRun(trained=trained, gate=gate, label_history=confirmed, report=report, version_dir=version_dir)
    publish_report_artifacts(
        key=f"training-report-{version}",
        markdown=report.markdown,
        table=run.artifact_rows(),
        description=f"Training report of model {version}",
    )
    outcome = run.outcome(promoted=current == version, current_model=current)
    emit_model_event(workspace_root=str(ws.root), outcome=outcome)
    return outcome


def _promote_if_allowed(models_dir: str, version: str, gate: PromotionDecision, promote: bool) -> str | None:
    """Promote ``version`` if asked and the gate allows; otherwise say why not, and how to promote it anyway.

    Return the version now current, if any.
    """
    logger = get_run_logger()
    if promote and gate.passed:
        promote_model(models_dir=models_dir, version=version)
        return version
    reasons = "; ".join(gate.reasons)
    if promote and gate.first_model:
        logger.error(
            "Model %s is saved but NOT promoted, and no model is current, so scoring cannot run until one is. "
            "Reasons: %s. Promote it anyway with: %s",
            version,
            reasons,
            promote_command(version),
        )
    elif promote:
        logger.warning(
            "Model %s is saved but NOT promoted; the current model keeps scoring. Reasons: %s", version, reasons
        )
    return current_version(storage.as_path(models_dir), required=False)
