"""The promotion gate: a retrained model becomes current only if its threshold holds up and it is not worse."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from data import storage
from data.errors import BundleError
from data.parquet import read_holdout_errors
from models.autoencoder import reconstruction_errors
from models.bundle import PROMOTION_FILE, current_version, load_bundle
from models.training.results import PromotionDecision, as_record
from models.training.retraining import read_matrix

MIN_ANOMALIES_FOR_RECALL_CHECK = 20
RECALL_TOLERANCE = 0.05


def flag_rate_tolerance(expected: float, rows: int) -> float:
    """Allowed distance between an observed and the expected flag rate: half the rate, or 4 binomial sigmas if wider."""
    return max(0.5 * expected, 4.0 * math.sqrt(expected * (1.0 - expected) / max(rows, 1)))


def cross_checked_flag_rates(holdout_normal_errors: np.ndarray, percentile: float) -> list[float]:
    """Fix the threshold on one half of the held-out normal rows and measure the flag rate on the other, both ways."""
    half = len(holdout_normal_errors) // 2
    first, second = holdout_normal_errors[:half], holdout_normal_errors[half:]
    return [float(np.mean(other > np.percentile(fit, percentile))) for fit, other in ((first, second), (second, first))]


def check_promotion(
    staging: Path,
    errors_path: str,
    holdout_path: str,
    threshold: float,
    percentile: float,
    models_dir: Path,
    feature_names: list[str],
) -> PromotionDecision:
    """Decide whether the staged model, with ``threshold`` at ``percentile``, may become current; save the decision.

    ``errors_path`` holds the errors of the normal rows the model did not see and of the held-out labelled
    anomalies, whose features ``holdout_path`` holds for the current model to score.
    """
    errors, labelled = read_holdout_errors(errors_path)
    normal_errors = errors[~labelled]
    expected = 1.0 - percentile / 100.0
    reasons: list[str] = []
    checks: dict[str, Any] = {}

    finite = bool(math.isfinite(threshold) and np.isfinite(errors).all())
    checks["finite_threshold_and_errors"] = finite
    if not finite:
        reasons.append("the threshold or some held-out reconstruction errors are not finite")

    rates = cross_checked_flag_rates(normal_errors, percentile) if finite else []
    tolerance = flag_rate_tolerance(expected, len(normal_errors) // 2)
    checks["flag_rate_cross_check"] = {"rates": rates, "expected": expected, "tolerance": tolerance}
    cross_check_failed = any(abs(rate - expected) > tolerance for rate in rates)
    if cross_check_failed:
        reasons.append(
            f"flag rate on unseen held-out normal rows was {rates}, not within {tolerance:.4f} of {expected:.4f}: "
            "the threshold does not generalise"
        )

    anomalies = int(labelled.sum())
    new_recall = float(np.mean(errors[labelled] > threshold)) if anomalies else None
    checks["holdout_anomalies"] = anomalies
    checks["new_recall"] = new_recall
    current = current_version(models_dir, required=False)
    checks["current_version"] = current
    if finite and current and anomalies >= MIN_ANOMALIES_FOR_RECALL_CHECK:
        try:
            incumbent = load_bundle(models_dir / current)
        except BundleError as exc:
            checks["current_recall"] = None
            checks["current_recall_skipped"] = f"current model does not load: {exc}"
        else:
            if incumbent.feature_names != feature_names:
                checks["current_recall"] = None
                checks["current_recall_skipped"] = "current model uses other features"
            else:
                holdout = pq.read_table(holdout_path)
                anomaly_rows = read_matrix(holdout, feature_names)[
                    holdout.column("labelled_anomaly").to_numpy(zero_copy_only=False)
                ]
                current_errors = reconstruction_errors(incumbent.model, anomaly_rows, incumbent.loss)
                current_recall = float(np.mean(current_errors > incumbent.threshold))
                allowed = max(
                    RECALL_TOLERANCE, 2.0 * math.sqrt(max(current_recall * (1 - current_recall), 1e-12) / anomalies)
                )
                checks["current_recall"] = current_recall
                checks["recall_tolerance"] = allowed
                if new_recall is not None and new_recall < current_recall - allowed:
                    reasons.append(
                        f"recall on {anomalies} held-out labelled anomalies is {new_recall:.3f}, "
                        f"clearly below the current model's {current_recall:.3f}"
                    )
    warnings: list[str] = []
    if current is None and finite and cross_check_failed and len(reasons) == 1:
        # Without a current model nothing can be scored: a first model whose threshold is only less
        # sure than hoped is better than none, and the flag-rate band of every night widens with it.
        warnings.append(
            f"promoted although {reasons.pop()}, because no model was current; "
            "retrain on more normal rows to replace it"
        )
    decision = PromotionDecision(
        passed=not reasons, reasons=reasons, warnings=warnings, first_model=current is None, checks=checks
    )
    storage.write_json(staging / PROMOTION_FILE, as_record(decision))
    return decision
