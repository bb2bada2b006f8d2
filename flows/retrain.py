"""Retraining flow: fit the autoencoder on normal rows and fix the threshold on held-out normal rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from data import storage
from data.locks import retraining_lock
from data.workspace import Workspace, default_workspace
from models.bundle import current_version, discard_staging, new_version, promote_command, staging_dir
from models.config import resolve_preset
from tasks.events import emit_model_event
from tasks.reporting import publish_report_artifacts, write_evaluation_report
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

PresetName = Literal["default", "seed"]


@flow(name="retrain-autoencoder", flow_run_name="retrain-{preset}-p{percentile}", timeout_seconds=6 * 3600)
def retrain_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    training_data: Annotated[str | None, Field(json_schema_extra={"title": "Training data"})] = None,
    preset: Annotated[PresetName, Field(json_schema_extra={"title": "Preset"})] = "default",
    percentile: Annotated[float, Field(gt=0, lt=100, json_schema_extra={"title": "Threshold percentile"})] = 98.0,
    label_column: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Label column"})] = "label",
    normal_label: Annotated[str, Field(json_schema_extra={"title": "Normal label value"})] = "0",
    all_rows_normal: Annotated[bool, Field(json_schema_extra={"title": "All rows are normal"})] = False,
    holdout_fraction: Annotated[float, Field(gt=0, lt=1, json_schema_extra={"title": "Hold-out fraction"})] = 0.2,
    epochs: Annotated[Annotated[int, Field(ge=1, le=10_000)] | None, Field(json_schema_extra={"title": "Epochs"})] = None,
    batch_size: Annotated[Annotated[int, Field(ge=1)] | None, Field(json_schema_extra={"title": "Batch size"})] = None,
    learning_rate: Annotated[Annotated[float, Field(gt=0, le=1)] | None, Field(json_schema_extra={"title": "Learning rate"})] = None,
    seed: Annotated[Annotated[int, Field(ge=0, le=4_294_967_295)] | None, Field(json_schema_extra={"title": "Random seed"})] = None,
    promote: Annotated[bool, Field(json_schema_extra={"title": "Promote the new model"})] = True,
    use_label_history: Annotated[bool, Field(json_schema_extra={"title": "Learn from labelled past nights"})] = False,
    label_history_days: Annotated[int, Field(ge=1, le=3660, json_schema_extra={"title": "Days of labelled nights"})] = 30,
    id_columns: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, json_schema_extra={"title": "Id columns of the labels"})] = ["row_id"],  # noqa: B006 - Prefect copies parameters
) -> dict[str, Any]:
    """Retrain the autoencoder on normal-labelled rows and fix the anomaly threshold on held-out normal rows.

    Args:
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/).
        training_data: Training Parquet: a file, a folder or a glob. Empty means the workspace's training/ folder.
        preset: Named model recipe: 'default' (works on standardised data) or 'seed' (the tutorial's recipe, for reproducing it).
        percentile: Percentile of held-out normal rows' reconstruction error that becomes the threshold (98 flags about 2% of normal rows).
        label_column: Column holding the class label in the training data.
        normal_label: Value of the label column that marks a normal row (compared as text, e.g. '0').
        all_rows_normal: Set when the training data has no label column and every row is normal.
        holdout_fraction: Share of normal rows held out from training to fix the threshold.
        epochs: Override the preset's maximum number of epochs.
        batch_size: Override the preset's training batch size.
        learning_rate: Override the preset's learning rate.
        seed: Override the preset's random seed (weights, shuffling, hold-out split).
        promote: Make the new model the one nightly scoring uses.
        use_label_history: Also train on rows of past nights (incoming/) that labels in labels/ confirm normal, and test on those they confirm anomalous.
        label_history_days: How many nights, ending today (UTC), the label history reaches back.
        id_columns: Columns that identify a row in both the label files and the nights' files.
    """
    logger = get_run_logger()
    ws = Workspace.at(workspace)
    config = resolve_preset(preset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    source = training_data or str(ws.training_dir)
    models_dir = str(ws.models_dir)

    # One retraining at a time per workspace: versions, staging folders and current.json are shared.
    with retraining_lock(ws):
        remove_stale_staging(models_dir)
        version = new_version()
        staging = str(staging_dir(ws.models_dir, version))
        logger.info("Retraining model %s with preset %r from %s", version, preset, source)
        try:
            # Step 1: normal rows only (with those of past nights that labels confirm), a seeded share held out for the threshold.
            confirmed = gather_label_history(str(ws.root), source, label_column, normal_label, dt.datetime.now(dt.UTC).date(), label_history_days, list(id_columns), staging) if use_label_history else None
            split = split_training_data(source, staging, label_column, normal_label, all_rows_normal, holdout_fraction, percentile, config.seed, confirmed["path"] if confirmed else None)
            # Step 2: with labelled anomalies held out, the candidate recipe that ranks them best; then train it.
            recipe = choose_recipe(split, preset, config.model_dump(), staging)
            history = train_autoencoder(split["train_path"], split["feature_names"], recipe["config"], staging)
            # Step 3: the threshold is the percentile of errors on normal rows the model did not see (held out, or out of fold).
            errors_path = compute_reconstruction_errors(staging, split, history["config"], recipe["normal_errors_path"])
            threshold = fix_threshold(errors_path, percentile, split["scheme"])
            # Step 4: bundle and reports, then the promotion gate, all inside the staging folder.
            save_model_bundle(staging, version, split, history, threshold, preset, label_column, normal_label, recipe)
            training_report = write_training_report(staging, version, errors_path, history, threshold, split, preset, recipe)
            holdout_summary = training_report["report"]["holdout_evaluation"]
            write_evaluation_report(holdout_summary, str(Path(staging) / "report"), "holdout-evaluation", f"Held-out evaluation, model {version}", {"model_version": version, "rows": "held-out normal rows and labelled anomalies"})
            gate = check_promotion_gate(staging, errors_path, threshold, models_dir, split["feature_names"])
            # Step 5: publish the version (a rename, or uploads with bundle.json last), then promote it if asked and the gate allows.
            version_dir = publish_model_version(staging, models_dir)
        except BaseException:
            discard_staging(staging)
            raise
        promoted = promote and gate["passed"]
        if promoted:
            promote_model(models_dir, version)
        elif promote and gate["first_model"]:
            logger.error(
                "Model %s is saved but NOT promoted, and no model is current, so scoring cannot run until one is. Reasons: %s. Promote it anyway with: %s",
                version, "; ".join(gate["reasons"]), promote_command(version),
            )
        elif promote:
            logger.warning("Model %s is saved but NOT promoted; the current model keeps scoring. Reasons: %s", version, "; ".join(gate["reasons"]))

    report_dir = storage.as_path(version_dir) / "report"
    publish_report_artifacts(
        f"training-report-{version}",
        training_report["markdown"],
        [{"metric": k, "value": v} for k, v in _training_table(training_report["report"]).items()] + [{"metric": "promotion gate", "value": "passed" if gate["passed"] else "; ".join(gate["reasons"])}],
        f"Training report of model {version}",
    )
    anomaly = training_report["report"]["anomaly_class"]
    outcome = {
        "model_version": version,
        "promoted": promoted,
        "promotion_refused": gate["reasons"],
        "promotion_warnings": gate["warnings"],
        "promote_command": promote_command(version) if gate["reasons"] else None,
        "current_model": version if promoted else current_version(storage.as_path(models_dir), required=False),
        "preset": preset,
        "recipe": recipe["name"],
        "recipe_candidates": recipe["candidates"],
        "threshold": threshold["value"],
        "percentile": percentile,
        "threshold_warning": threshold["warning"],
        "training_rows": split["rows_train"],
        "validation_rows": split["rows_threshold"],
        "threshold_scheme": split["scheme"],
        "holdout_anomalies": split["rows_holdout_anomalies"],
        "label_history": {k: v for k, v in confirmed.items() if k != "path"} if confirmed else None,
        "epochs_run": history["epochs_run"],
        "fit_seconds": history["fit_seconds"],
        "holdout_recall": anomaly.get("recall"),
        "holdout_roc_auc": anomaly.get("roc_auc"),
        "model_dir": version_dir,
        "report": str(report_dir / "training-report.md"),
        "report_json": str(report_dir / "training-report.json"),
    }
    emit_model_event(str(ws.root), outcome)
    return outcome


def _training_table(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_version": report["model_version"],
        "preset": report["preset"],
        "training rows": report["training"]["rows_train"],
        "held-out normal rows": report["training"]["rows_holdout_normal"],
        "normal rows fixing the threshold": report["training"]["rows_threshold"],
        "threshold": report["threshold"]["value"],
        "percentile": report["threshold"]["percentile"],
        "held-out flag rate": report["holdout_normal"]["flag_rate"],
        "epochs run": report["history"]["epochs_run"],
        **{f"held-out anomaly {k}": v for k, v in report["anomaly_class"].items()},
    }
