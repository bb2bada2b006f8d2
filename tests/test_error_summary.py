"""The streaming error summary: exact counts, quantiles and AUCs within the stated bounds of scikit-learn's.

Labels are left out when missing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from data.parquet import ANOMALY, NORMAL, UNLABELLED, label_classes
from models.monitoring.error_summary import ErrorDistribution, combine, summarize


def _scored(seed: int, n: int, shift: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Squared-error-like scores of normal rows and of anomalies that overlap them."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.05
    errors = scale * rng.chisquare(8, size=n) / 8
    errors[truth] *= 1 + shift * rng.random(int(truth.sum()))
    return errors, np.where(truth, ANOMALY, NORMAL).astype(np.int8)


@pytest.mark.parametrize(("seed", "shift", "scale"), [(0, 0.5, 1.0), (1, 2.0, 1e-4), (2, 0.2, 30.0), (3, 5.0, 0.01)])
def test_streamed_aucs_and_quantiles_match_scikit_learn_within_the_stated_bounds(seed, shift, scale):
    errors, classes = _scored(seed, 200_000, shift, scale)
    threshold = float(np.percentile(errors[classes == NORMAL], 98))
    distribution = ErrorDistribution(threshold)
    for chunk in np.array_split(np.arange(len(errors)), 7):
        distribution.add(errors[chunk], classes[chunk])
    summary = summarize(distribution, 98.0)

    truth = classes == ANOMALY
    assert abs(summary["labels"]["roc_auc"] - roc_auc_score(truth, errors)) <= 0.001
    assert abs(summary["labels"]["pr_auc"] - average_precision_score(truth, errors)) <= 0.001
    for level, value in summary["error_quantiles"].items():
        assert value == pytest.approx(np.percentile(errors, float(level)), rel=0.002), level
    # Counts against the threshold are exact.
    flagged = errors > threshold
    (tn, fp), (fn, tp) = summary["labels"]["confusion_matrix"]["rows_true_columns_predicted"]
    assert (tn, fp, fn, tp) == (
        int((~truth & ~flagged).sum()),
        int((~truth & flagged).sum()),
        int((truth & ~flagged).sum()),
        int((truth & flagged).sum()),
    )
    assert summary["rows_flagged"] == int(flagged.sum())


def test_batch_summaries_add_up_to_the_summary_of_the_whole_night():
    errors, classes = _scored(5, 50_000, 1.0, 1.0)
    threshold = 1.5
    whole = ErrorDistribution(threshold)
    whole.add(errors, classes)
    parts = []
    for chunk in (slice(0, 10_000), slice(10_000, 35_000), slice(35_000, None)):
        part = ErrorDistribution(threshold)
        part.add(errors[chunk], classes[chunk])
        parts.append(summarize(ErrorDistribution.from_json(part.to_json()), 98.0))
    combined = combine(parts, threshold, 98.0)
    expected = summarize(whole, 98.0)
    for key in ("rows_scored", "rows_flagged", "histogram", "error_quantiles", "labels"):
        assert combined[key] == expected[key], key


def test_a_small_batch_writes_only_its_filled_bins_and_reports_written_as_a_span_still_load():
    import json

    errors, classes = _scored(7, 200, 1.0, 1.0)
    distribution = ErrorDistribution(1.5)
    distribution.add(errors, classes)
    payload = distribution.to_json()
    filled = sum(len(part["bins"]) for part in payload["fine"].values())
    assert filled <= 200 and len(json.dumps(payload)) < 6_000
    again = ErrorDistribution.from_json(json.loads(json.dumps(payload)))
    for name, counts in distribution.fine.items():
        assert np.array_equal(again.fine[name], counts), name
    # The form reports took before: each class's counts from its first to its last filled bin.
    spans = {}
    for name, counts in distribution.fine.items():
        bins = np.flatnonzero(counts)
        start, stop = (int(bins[0]), int(bins[-1]) + 1) if len(bins) else (0, 0)
        spans[name] = {"start": start, "counts": counts[start:stop].tolist()}
    earlier = ErrorDistribution.from_json({**payload, "fine": spans})
    assert summarize(earlier, 98.0) == summarize(distribution, 98.0)


def test_unlabelled_rows_count_apart_and_stay_out_of_every_metric():
    errors, classes = _scored(6, 20_000, 1.0, 1.0)
    classes = classes.copy()
    classes[::4] = UNLABELLED
    distribution = ErrorDistribution(1.5)
    distribution.add(errors, classes)
    summary = summarize(distribution, 98.0)
    labelled = classes != UNLABELLED
    assert (
        summary["rows_unlabelled"] == 5_000 and summary["rows_labelled"] == 15_000 and summary["rows_scored"] == 20_000
    )
    assert sum(map(sum, summary["labels"]["confusion_matrix"]["rows_true_columns_predicted"])) == 15_000
    assert abs(summary["labels"]["roc_auc"] - roc_auc_score(classes[labelled] == ANOMALY, errors[labelled])) <= 0.001


def test_a_batch_without_labels_has_no_label_metrics():
    distribution = ErrorDistribution(1.0)
    distribution.add(np.linspace(0, 3, 300))
    summary = summarize(distribution, 98.0)
    assert summary["labels"] is None and summary["rows_unlabelled"] == 300 and summary["rows_flagged"] == 200


def test_label_classes_treat_null_and_nan_as_unlabelled_whatever_the_column_type():
    assert label_classes(pa.array([0, 1, None, 2]), "0").tolist() == [NORMAL, ANOMALY, UNLABELLED, ANOMALY]
    assert label_classes(pa.array([0.0, 1.0, float("nan"), None]), "0").tolist() == [
        NORMAL,
        ANOMALY,
        UNLABELLED,
        UNLABELLED,
    ]
    assert label_classes(pa.array(["ok", "fraud", None]), "ok").tolist() == [NORMAL, ANOMALY, UNLABELLED]


def test_distributions_of_other_thresholds_do_not_add_up():
    with pytest.raises(ValueError, match="thresholds"):
        ErrorDistribution(1.0).merge(ErrorDistribution(2.0))
