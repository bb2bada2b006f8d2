"""Evaluation maths and report rendering: counts, label metrics, histograms, JSON, Markdown and PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic import atomic_path, write_json_atomic, write_text_atomic

HISTOGRAM_BINS = 60
HISTOGRAM_SPAN = 4.0  # bins cover [0, 4 x threshold]; anything beyond lands in the last bin


def histogram_edges(threshold: float) -> np.ndarray:
    """Return fixed bin edges derived from the threshold, so histograms of many batches add up."""
    return np.linspace(0.0, HISTOGRAM_SPAN * threshold, HISTOGRAM_BINS + 1)


def error_histogram(errors: np.ndarray, threshold: float) -> list[int]:
    """Count errors into the fixed bins; errors past the last edge count in the last bin."""
    edges = histogram_edges(threshold)
    counts, _ = np.histogram(errors, bins=edges)
    # Counted apart rather than clipped, so a 10-million-row batch needs no second copy of its errors.
    counts[-1] += int(np.count_nonzero(errors > edges[-1]))
    return [int(c) for c in counts]


def label_metrics(is_true_anomaly: np.ndarray, is_flagged: np.ndarray, errors: np.ndarray | None) -> dict[str, Any]:
    """Per-class precision/recall/F1, confusion matrix and (with errors) ROC-AUC and PR-AUC of the anomaly class."""
    from sklearn.metrics import average_precision_score, classification_report, confusion_matrix, roc_auc_score

    y_true = np.asarray(is_true_anomaly, dtype=np.int8)
    y_pred = np.asarray(is_flagged, dtype=np.int8)
    metrics: dict[str, Any] = {
        "classification_report": classification_report(
            y_true, y_pred, labels=[0, 1], target_names=["normal", "anomaly"], output_dict=True, zero_division=0
        ),
        "confusion_matrix": {"labels": ["normal", "anomaly"], "rows_true_columns_predicted": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()},
        "roc_auc": None,
        "pr_auc": None,
    }
    if errors is not None and 0 < y_true.sum() < len(y_true):
        metrics["roc_auc"] = float(roc_auc_score(y_true, errors))
        metrics["pr_auc"] = float(average_precision_score(y_true, errors))
    return metrics


def metrics_from_confusion(matrix: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Rebuild the per-class report from a summed 2x2 confusion matrix (rows true, columns predicted)."""
    (tn, fp), (fn, tp) = matrix
    report: dict[str, Any] = {}
    for name, hit, false_pos, miss in (("normal", tn, fn, fp), ("anomaly", tp, fp, fn)):
        precision = hit / (hit + false_pos) if hit + false_pos else 0.0
        recall = hit / (hit + miss) if hit + miss else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1-score": f1, "support": int(hit + miss)}
    report["accuracy"] = (tn + tp) / max(1, tn + fp + fn + tp)
    return report


def summarize_errors(
    errors: np.ndarray,
    threshold: float,
    percentile: float,
    is_true_anomaly: np.ndarray | None,
) -> dict[str, Any]:
    """Summarise one set of scored rows: counts, flag rate against the expected rate, histogram and label metrics."""
    errors = np.asarray(errors, dtype=np.float64)
    flagged = errors > threshold
    rows = int(len(errors))
    summary: dict[str, Any] = {
        "rows_scored": rows,
        "rows_flagged": int(flagged.sum()),
        "flag_rate": float(flagged.mean()) if rows else 0.0,
        "expected_flag_rate": round(1.0 - percentile / 100.0, 10),
        "threshold": float(threshold),
        "percentile": float(percentile),
        "error_quantiles": _quantiles(errors) if rows else {},
        "histogram": {"edges": histogram_edges(threshold).tolist(), "counts": error_histogram(errors, threshold)},
        "labels": None,
    }
    if is_true_anomaly is not None and rows:
        summary["labels"] = label_metrics(is_true_anomaly, flagged, errors)
    return summary


def _quantiles(errors: np.ndarray) -> dict[str, float]:
    levels = (50, 90, 98, 99)
    return {f"{q:g}": float(v) for q, v in zip(levels, np.percentile(errors, levels), strict=True)}


def anomaly_class_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    """Pick precision, recall, F1, ROC-AUC and PR-AUC of the anomaly class out of a summary."""
    labels = summary.get("labels")
    if not labels:
        return {}
    anomaly = labels["classification_report"]["anomaly"]
    return {
        "precision": anomaly["precision"],
        "recall": anomaly["recall"],
        "f1": anomaly["f1-score"],
        "roc_auc": labels.get("roc_auc"),
        "pr_auc": labels.get("pr_auc"),
    }


def plot_error_histogram(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Draw the error histogram with the threshold line as a PNG."""
    plt = _pyplot()
    edges = np.asarray(summary["histogram"]["edges"])
    counts = np.asarray(summary["histogram"]["counts"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4C78A8", edgecolor="white", linewidth=0.3)
    ax.axvline(summary["threshold"], color="#E45756", linewidth=2, label=f"threshold {summary['threshold']:.4g} (p{summary['percentile']:g})")
    ax.set_yscale("symlog")
    ax.set_xlabel("reconstruction error (last bin holds everything beyond)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    return _save_figure(fig, path)


def plot_loss_curves(loss: Sequence[float], val_loss: Sequence[float], path: Path, title: str) -> Path:
    """Draw training and validation loss per epoch as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, label="training loss")
    if len(val_loss):
        ax.plot(np.arange(1, len(val_loss) + 1), val_loss, label="validation loss (early stopping)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return _save_figure(fig, path)


def _pyplot():  # noqa: ANN202 - matplotlib's module has no useful type
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return path


def render_markdown(title: str, sections: dict[str, Any], images: Sequence[str] = ()) -> str:
    """Render a report as Markdown: a title, key-value tables per section and linked images."""
    lines = [f"# {title}", ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", ""]
        if isinstance(body, dict):
            lines += ["| key | value |", "|---|---|"]
            lines += [f"| {key} | {_format(value)} |" for key, value in body.items()]
        elif isinstance(body, list) and body and isinstance(body[0], dict):
            keys = list(body[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_format(row.get(k)) for k in keys) + " |" for row in body]
        else:
            lines.append(str(body))
        lines.append("")
    lines += [f"![{Path(image).stem}]({Path(image).name})" for image in images]
    return "\n".join(lines).rstrip() + "\n"


def classification_table(labels: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the per-class rows of a classification report, as the tutorial prints them."""
    report = labels["classification_report"]
    return [
        {"class": name, "precision": report[name]["precision"], "recall": report[name]["recall"], "f1-score": report[name]["f1-score"], "support": report[name]["support"]}
        for name in ("normal", "anomaly")
    ]


def _format(value: Any) -> str:
    if isinstance(value, float):
        # Supports come back from scikit-learn as floats; print whole numbers as such.
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def write_report_files(report: dict[str, Any], markdown: str, directory: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(directory / f"{stem}.json", report)
    md_path = write_text_atomic(directory / f"{stem}.md", markdown)
    return {"json": os.fspath(json_path), "markdown": os.fspath(md_path)}


def combine_summaries(summaries: Sequence[dict[str, Any]], threshold: float, percentile: float) -> dict[str, Any]:
    """Add up batch summaries into one: counts, histograms and confusion matrices sum exactly; AUCs do not."""
    rows = sum(s["rows_scored"] for s in summaries)
    flagged = sum(s["rows_flagged"] for s in summaries)
    counts = np.sum([s["histogram"]["counts"] for s in summaries], axis=0) if summaries else np.zeros(HISTOGRAM_BINS, dtype=int)
    combined: dict[str, Any] = {
        "rows_scored": int(rows),
        "rows_flagged": int(flagged),
        "flag_rate": flagged / rows if rows else 0.0,
        "expected_flag_rate": round(1.0 - percentile / 100.0, 10),
        "threshold": float(threshold),
        "percentile": float(percentile),
        "error_quantiles": {},
        "histogram": {"edges": histogram_edges(threshold).tolist(), "counts": [int(c) for c in counts]},
        "labels": None,
    }
    labelled = [s["labels"] for s in summaries if s.get("labels")]
    if labelled and len(labelled) == len(summaries):
        matrix = np.sum([lab["confusion_matrix"]["rows_true_columns_predicted"] for lab in labelled], axis=0).tolist()
        combined["labels"] = {
            "classification_report": metrics_from_confusion(matrix),
            "confusion_matrix": {"labels": ["normal", "anomaly"], "rows_true_columns_predicted": matrix},
            "roc_auc": None,
            "pr_auc": None,
        }
    return combined


def write_evaluation_report(summary: dict[str, Any], directory: Path, stem: str, title: str, context: dict[str, Any]) -> dict[str, str]:
    """Write one evaluation report as JSON, Markdown and an error-histogram PNG; return their paths."""
    png = plot_error_histogram(summary, directory / f"{stem}-error-histogram.png", title)
    anomaly = anomaly_class_metrics(summary)
    report = {"kind": "evaluation", **context, **summary, "anomaly_class": anomaly, "images": {"error_histogram": png.name}}
    sections: dict[str, Any] = {
        "Summary": {
            **context,
            "rows scored": summary["rows_scored"],
            "rows flagged": summary["rows_flagged"],
            "flag rate": summary["flag_rate"],
            "expected flag rate": summary["expected_flag_rate"],
            "threshold": summary["threshold"],
        }
    }
    if summary.get("labels"):
        sections["Per class (label column present)"] = classification_table(summary["labels"])
        (tn, fp), (fn, tp) = summary["labels"]["confusion_matrix"]["rows_true_columns_predicted"]
        sections["Confusion matrix"] = [
            {"true \\ predicted": "normal", "normal": tn, "anomaly": fp},
            {"true \\ predicted": "anomaly", "normal": fn, "anomaly": tp},
        ]
        sections["Ranking quality (anomaly class)"] = {"ROC-AUC": anomaly.get("roc_auc"), "PR-AUC": anomaly.get("pr_auc")}
    markdown = render_markdown(title, sections, [os.fspath(png)])
    return {**write_report_files(report, markdown, directory, stem), "error_histogram": os.fspath(png)}
