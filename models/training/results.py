"""What each retraining step hands to the next: frozen values, written out as JSON exactly as they read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from data.parquet import LabelRule
from models.config import AutoencoderConfig

# The split's figures the training report and bundle record, in their order.
SPLIT_FIGURES = (
    "scheme", "folds", "rows_total", "rows_train", "rows_holdout_normal", "rows_threshold", "rows_holdout_anomalies",
    "rows_unlabelled", "rows_label_history_normal", "rows_label_history_anomalies", "fingerprint", "ignored_columns",
    "missing_values", "missing_counts", "rows_read",
)  # fmt: skip


def as_record(value: Any) -> dict[str, Any]:
    """Return a result as the plain dict its JSON holds, configs included."""
    record = dataclasses.asdict(value)
    return {key: item.model_dump() if isinstance(item, AutoencoderConfig) else item for key, item in record.items()}


@dataclass(frozen=True)
class ConfirmedRows:
    """Rows of past nights that later labels confirmed, gathered into one Parquet file for training."""

    path: str
    first_date: str
    last_date: str
    nights_with_files: int
    rows_confirmed_normal: int
    rows_confirmed_anomalous: int
    by_night: list[dict[str, Any]]


@dataclass(frozen=True)
class TrainingSplit:
    """The normal rows to train on and the rows that fix and test the threshold, as Parquet files, with counts.

    ``scheme`` is ``holdout`` (a seeded share of normal rows held out) or ``cross_fit`` (every normal row
    trained on and scored out of fold, in ``folds`` folds).
    """

    train_path: str
    holdout_path: str
    feature_names: list[str]
    scheme: str
    folds: int | None
    rows_total: int
    rows_train: int
    rows_holdout_normal: int
    # The normal rows whose errors fix the threshold: the held-out ones, or every one out of fold.
    rows_threshold: int
    rows_holdout_anomalies: int
    rows_unlabelled: int = 0
    rows_label_history_normal: int = 0
    rows_label_history_anomalies: int = 0
    source_files: list[str] = field(default_factory=list)
    fingerprint: str = ""
    # The training data's other columns, with why each is not a feature (label, identifier, type).
    ignored_columns: dict[str, str] = field(default_factory=dict)
    # Whether missing values are filled in by the model ('fill') or refused ('quarantine'), and how many
    # of each feature's training values were missing.
    missing_values: str = "fill"
    missing_counts: dict[str, int] = field(default_factory=dict)
    # How many rows the training files hold; above max_training_rows, rows_total of them were sampled.
    rows_read: int = 0
    # Each categorical feature's vocabulary (its codes' order), and each feature's kind.
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def categorical_columns(self) -> list[tuple[int, int]]:
        """Return (column, slots) of each categorical feature: its vocabulary's values and one for unseen ones."""
        return [(self.feature_names.index(name), len(values) + 1) for name, values in self.vocabularies.items()]

    def figures(self) -> dict[str, Any]:
        """Return the scheme and row counts the training report records."""
        return {name: getattr(self, name) for name in SPLIT_FIGURES}


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe trained: the preset's own, or the candidate that ranked held-out labelled anomalies best."""

    name: str
    config: AutoencoderConfig
    chosen_on: str | None
    candidates: list[dict[str, Any]]
    note: str | None
    # Out-of-fold errors of the normal rows under the chosen settings, kept for the threshold when cross-fitting.
    normal_errors_path: str | None = None

    def record(self) -> dict[str, Any]:
        """Return what the bundle and training report say about the choice."""
        return {"name": self.name, "chosen_on": self.chosen_on, "candidates": self.candidates, "note": self.note}

    @classmethod
    def preset(cls, name: str, config: AutoencoderConfig, note: str | None = None) -> RecipeChoice:
        """Return the choice of a preset's own recipe, made without candidates."""
        return cls(name=name, config=config, chosen_on=None, candidates=[], note=note)


@dataclass(frozen=True)
class ModelFit:
    """How the saved model trained: its loss curves, epochs, time, diverged attempts and the sized config."""

    loss: list[float]
    val_loss: list[float]
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    fit_seconds: float
    diverged_attempts: list[dict[str, Any]]
    config: AutoencoderConfig


@dataclass(frozen=True)
class ThresholdFit:
    """The threshold, the percentile and rows it was fixed on, its uncertainty and the errors' statistics."""

    value: float
    percentile: float
    rows: int
    uncertainty: dict[str, Any]
    warning: str | None
    calibration: dict[str, Any]
    error_reference: dict[str, Any]


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a staged model may become current, why not, what it was promoted despite, and the checks made."""

    passed: bool
    reasons: list[str]
    warnings: list[str]
    first_model: bool
    checks: dict[str, Any]


@dataclass(frozen=True)
class TrainedModel:
    """A staged model version with everything that made it: what the bundle, report and gate are written from."""

    version: str
    preset: str
    labels: LabelRule
    split: TrainingSplit
    recipe: RecipeChoice
    fit: ModelFit
    threshold: ThresholdFit
    # The errors of the normal rows the model did not see and of the held-out labelled anomalies.
    errors_path: str


@dataclass(frozen=True)
class TrainingReport:
    """The training report as written: its JSON document and its Markdown."""

    report: dict[str, Any]
    markdown: str
