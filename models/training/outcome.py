"""What one retraining run produced, as the run's JSON outcome and its table artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data import storage
from models.bundle import promote_command
from models.training.results import ConfirmedRows, PromotionDecision, TrainedModel, TrainingReport, as_record


@dataclass(frozen=True)
class RetrainingRun:
    """A published model version with the split, recipe, fit, threshold, gate and report that made it."""

    trained: TrainedModel
    gate: PromotionDecision
    label_history: ConfirmedRows | None
    report: TrainingReport
    version_dir: str

    def artifact_rows(self) -> list[dict[str, Any]]:
        """Return the training report's headline figures and the gate's decision, one metric a row."""
        report = self.report.report
        figures = {
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
        gate = "passed" if self.gate.passed else "; ".join(self.gate.reasons)
        return [{"metric": k, "value": v} for k, v in figures.items()] + [{"metric": "promotion gate", "value": gate}]

    def outcome(self, promoted: bool, current_model: str | None) -> dict[str, Any]:
        """Return the run's JSON outcome, given whether the version was promoted and which model is current."""
        trained, split = self.trained, self.trained.split
        anomaly = self.report.report["anomaly_class"]
        report_dir = storage.as_path(self.version_dir) / "report"
        return {
            "model_version": trained.version,
            "promoted": promoted,
            "promotion_refused": self.gate.reasons,
            "promotion_warnings": self.gate.warnings,
            "promote_command": promote_command(trained.version) if self.gate.reasons else None,
            "current_model": current_model,
            "preset": trained.preset,
            "recipe": trained.recipe.name,
            "recipe_candidates": trained.recipe.candidates,
            "threshold": trained.threshold.value,
            "percentile": trained.threshold.percentile,
            "threshold_warning": trained.threshold.warning,
            "training_rows": split.rows_train,
            # Above max_training_rows, rows_total is a sample of the rows_read the files hold.
            "training_rows_read": split.rows_read,
            "training_rows_sampled": split.rows_total if split.rows_read > split.rows_total else None,
            "validation_rows": split.rows_threshold,
            "threshold_scheme": split.scheme,
            "holdout_anomalies": split.rows_holdout_anomalies,
            "ignored_columns": split.ignored_columns,
            "missing_values_filled": split.missing_counts,
            "label_history": {k: v for k, v in as_record(self.label_history).items() if k != "path"}
            if self.label_history
            else None,
            "epochs_run": trained.fit.epochs_run,
            "fit_seconds": trained.fit.fit_seconds,
            "holdout_recall": anomaly.get("recall"),
            "holdout_roc_auc": anomaly.get("roc_auc"),
            "model_dir": self.version_dir,
            "report": str(report_dir / "training-report.md"),
            "report_json": str(report_dir / "training-report.json"),
        }
