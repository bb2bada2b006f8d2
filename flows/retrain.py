"""Retraining flow: fit the autoencoder on normal rows and fix the threshold on held-out normal rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from data.workspace import Workspace, default_workspace
from models.bundle import discard_staging, new_version, staging_dir
from models.config import resolve_preset
from tasks.reporting import publish_report_artifacts, write_evaluation_report
from tasks.training import (
    compute_reconstruction_errors,
    fix_threshold,
    promote_model,
    publish_model_version,
    save_model_bundle,
    split_training_data,
    train_autoencoder,
    write_training_report,
)

PresetName = Literal["default", "seed"]


@flow(name="retrain-autoencoder", flow_run_name="retrain-{preset}-p{percentile}", timeout_seconds=6 * 3600)
def retrain_flow(
    workspace: str = default_workspace(),
    training_data: str | None = None,
    preset: PresetName = "default",
    percentile: Annotated[float, Field(gt=0, lt=100)] = 98.0,
    label_column: str = "label",
    normal_label: str = "0",
    all_rows_normal: bool = False,
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
    epochs: Annotated[int, Field(ge=1, le=10_000)] | None = None,
    batch_size: Annotated[int, Field(ge=1)] | None = None,
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = None,
    seed: int | None = None,
    promote: bool = True,
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
    """
    logger = get_run_logger()
    ws = Workspace.at(workspace)
    config = resolve_preset(preset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    source = training_data or os.fspath(ws.training_dir)
    version = new_version()
    staging = os.fspath(staging_dir(ws.models_dir, version))
    logger.info("Retraining model %s with preset %r from %s", version, preset, source)

    try:
        # Step 1: normal rows only, with a seeded share held out for the threshold.
        split = split_training_data(source, staging, label_column, normal_label, all_rows_normal, holdout_fraction, percentile, config.seed)
        # Step 2: build and train the autoencoder; its scaling is learnt from training rows and saved inside it.
        history = train_autoencoder(split["train_path"], split["feature_names"], config.model_dump(), staging)
        # Step 3: the threshold is the percentile of errors on held-out normal rows.
        errors_path = compute_reconstruction_errors(staging, split["holdout_path"], split["feature_names"], config.loss)
        threshold = fix_threshold(errors_path, percentile)
        # Step 4: bundle, reports, publish, promote.
        save_model_bundle(staging, version, split, history, threshold, config.model_dump(), preset, label_column, normal_label)
        training_report = write_training_report(staging, version, errors_path, history, threshold, split, preset)
        holdout_summary = training_report["report"]["holdout_evaluation"]
        write_evaluation_report(holdout_summary, os.fspath(Path(staging) / "report"), "holdout-evaluation", f"Held-out evaluation, model {version}", {"model_version": version, "rows": "held-out normal rows and labelled anomalies"})
        version_dir = publish_model_version(staging)
        if promote:
            promote_model(os.fspath(ws.models_dir), version)
    except BaseException:
        discard_staging(staging)
        raise
    report_dir = Path(version_dir) / "report"
    publish_report_artifacts(
        f"training-report-{version}",
        training_report["markdown"],
        [{"metric": k, "value": v} for k, v in _training_table(training_report["report"]).items()],
        f"Training report of model {version}",
    )
    anomaly = training_report["report"]["anomaly_class"]
    return {
        "model_version": version,
        "promoted": promote,
        "preset": preset,
        "threshold": threshold["value"],
        "percentile": percentile,
        "training_rows": split["rows_train"],
        "validation_rows": split["rows_holdout_normal"],
        "holdout_anomalies": split["rows_holdout_anomalies"],
        "epochs_run": history["epochs_run"],
        "fit_seconds": history["fit_seconds"],
        "holdout_recall": anomaly.get("recall"),
        "holdout_roc_auc": anomaly.get("roc_auc"),
        "model_dir": version_dir,
        "report": os.fspath(report_dir / "training-report.md"),
        "report_json": os.fspath(report_dir / "training-report.json"),
    }


def _training_table(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_version": report["model_version"],
        "preset": report["preset"],
        "training rows": report["training"]["rows_train"],
        "held-out normal rows": report["training"]["rows_holdout_normal"],
        "threshold": report["threshold"]["value"],
        "percentile": report["threshold"]["percentile"],
        "held-out flag rate": report["holdout_normal"]["flag_rate"],
        "epochs run": report["history"]["epochs_run"],
        **{f"held-out anomaly {k}": v for k, v in report["anomaly_class"].items()},
    }
