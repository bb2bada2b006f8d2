"""Evaluation maths and report rendering: counts, label metrics, histograms, JSON, Markdown and PNG."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data import storage


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
    """Draw the error histogram with the threshold line (and its interval) as a PNG.

    The PNG also shows the flag rate against its all-normal band.
    """
    plt = _pyplot()
    edges = np.asarray(summary["histogram"]["edges"])
    counts = np.asarray(summary["histogram"]["counts"])
    by_class = summary["histogram"].get("counts_by_class") or {}
    band = summary.get("flag_rate_band")
    if band:
        fig, (ax, rate_ax) = plt.subplots(2, 1, figsize=(7, 5), height_ratios=[4, 1])
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if "normal" in by_class and "anomaly" in by_class:
        # Labelled rows: the two classes overlaid, as the tutorial draws them.
        for name, color in (("normal", "#4C78A8"), ("anomaly", "#F58518"), ("unlabelled", "#9D9D9D")):
            if name in by_class:
                ax.bar(
                    edges[:-1],
                    by_class[name],
                    width=np.diff(edges),
                    align="edge",
                    color=color,
                    alpha=0.6,
                    label=f"{name} rows",
                )
    else:
        ax.bar(
            edges[:-1], counts, width=np.diff(edges), align="edge", color="#4C78A8", edgecolor="white", linewidth=0.3
        )
    ax.axvline(
        summary["threshold"],
        color="#E45756",
        linewidth=2,
        label=f"threshold {summary['threshold']:.4g} (p{summary['percentile']:g})",
    )
    if summary.get("threshold_interval"):
        low, high = summary["threshold_interval"]
        ax.axvspan(
            low, high, color="#E45756", alpha=0.15, label=f"95% interval of the threshold [{low:.4g}, {high:.4g}]"
        )
    ax.set_yscale("symlog")
    ax.set_xlabel("reconstruction error (last bin holds everything beyond)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if band:
        low, high = band
        observed = summary["flag_rate"]
        rate_ax.axvspan(
            low,
            high,
            color="#54A24B",
            alpha=0.3,
            label=f"{summary.get('flag_rate_band_level', 0.99):.0%} band of an all-normal batch",
        )
        rate_ax.plot(
            [observed],
            [0.5],
            "o",
            color="#E45756" if summary.get("flag_rate_verdict") != "within" else "#222222",
            label=f"observed {observed:.3%}: {summary.get('flag_rate_verdict')}",
        )
        span = max(high, observed) - min(low, observed)
        rate_ax.set_xlim(max(0.0, min(low, observed) - 0.3 * span - 1e-4), max(high, observed) + 0.3 * span + 1e-4)
        rate_ax.set_yticks([])
        rate_ax.set_xlabel("flag rate")
        rate_ax.legend(fontsize=8, loc="upper right")
    return _save_figure(fig, path)


def plot_reasons(reasons: dict[str, Any], path: Path, title: str, most: int = 15) -> Path:
    """Draw, per feature, how often it is flagged rows' first reason and its mean share of their error, as a PNG."""
    plt = _pyplot()
    rows = reasons["table"][:most][::-1]
    names = [row["feature"] for row in rows]
    fig, (first, share) = plt.subplots(1, 2, figsize=(9, 0.35 * len(rows) + 1.5), sharey=True)
    first.barh(names, [row["reason_1_share_of_flagged"] for row in rows], color="#E45756")
    first.set_xlabel("share of flagged rows where it is reason_1")
    share.barh(names, [row["mean_share"] for row in rows], color="#4C78A8")
    share.set_xlabel("mean share of a flagged row's error")
    fig.suptitle(title)
    return _save_figure(fig, path)


def plot_drift(drift: dict[str, Any], path: Path, title: str, most: int = 4) -> Path:
    """Draw the most drifted features' and the score's shares of rows per reference bin, as a PNG.

    Each shows the night against the reference.
    """
    plt = _pyplot()
    panels = [(row["feature"], row) for row in drift["features"][:most]] + [("reconstruction error", drift["score"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, row) in zip(axes[0], panels, strict=True):
        bins = np.arange(len(row["reference_share"]))
        ax.bar(bins - 0.2, row["reference_share"], width=0.4, color="#9D9D9D", label="reference")
        ax.bar(
            bins + 0.2,
            row["night_share"],
            width=0.4,
            color="#E45756" if row["drifted"] else "#4C78A8",
            label="this night",
        )
        ax.set_title(f"{name}\nPSI {row['psi']:.3f} (cut-off {row['cutoff']:.3g})", fontsize=9)
        ax.set_xlabel("reference decile")
        ax.set_xticks(bins)
        if "night_missing_share" in row:
            ax.set_xticklabels([*map(str, bins[:-1]), "missing"])
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("share of rows")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return _save_figure(fig, path)


def drift_table(drift: dict[str, Any], most: int = 15) -> list[dict[str, Any]]:
    """Return the rows of a report's drift table: the score, then the most drifted features."""
    # Where the reference counts missing values, each feature's share of them, filled in by the model, is shown.
    missing = any("night_missing_share" in row for row in drift["features"])
    rows = [
        {
            "measure of": "reconstruction error",
            "PSI": drift["score"]["psi"],
            "cut-off": drift["score"]["cutoff"],
            "drift": "yes" if drift["score"]["drifted"] else "no",
            **({"missing (training / night)": ""} if missing else {}),
        }
    ]
    rows += [
        {
            "measure of": row["feature"],
            "PSI": row["psi"],
            "cut-off": row["cutoff"],
            "drift": "yes" if row["drifted"] else "no",
            **({"missing (training / night)": _missing_shares(row)} if missing else {}),
        }
        for row in drift["features"][:most]
    ]
    return rows


def _missing_shares(row: dict[str, Any]) -> str:
    return f"{row['reference_missing_share']:.2%} / {row['night_missing_share']:.2%}"


def plot_trend(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Draw precision, recall and flag rate per scored date, with a line where the model version changes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    dates = [dt.date.fromisoformat(r["scored_date"]) for r in rows]
    for key, color in (("precision", "#4C78A8"), ("recall", "#F58518"), ("flag_rate", "#54A24B")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(dates, values, "o-", color=color, label=key.replace("_", " "))
    for previous, row, date in zip(rows, rows[1:], dates[1:], strict=False):
        if row["model_version"] != previous["model_version"]:
            ax.axvline(date, color="#9D9D9D", linestyle="--", linewidth=1)
            ax.annotate(f"model {row['model_version']}", (date, 1.0), fontsize=7, rotation=90, va="top", ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("scored date")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
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
    with storage.staged_path(path) as tmp:
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
        {
            "class": name,
            "precision": report[name]["precision"],
            "recall": report[name]["recall"],
            "f1-score": report[name]["f1-score"],
            "support": report[name]["support"],
        }
        for name in ("normal", "anomaly")
    ]


def _format(value: Any) -> str:
    if isinstance(value, float):
        # Supports come back from scikit-learn as floats; print whole numbers as such.
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def report_files(directory: Path, stem: str) -> dict[str, Path]:
    """Return the paths of a report's JSON and Markdown files."""
    return {"json": directory / f"{stem}.json", "markdown": directory / f"{stem}.md"}


def write_report_files(report: dict[str, Any], markdown: str, directory: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``directory``; return their paths."""
    paths = report_files(directory, stem)
    json_path = storage.write_json(paths["json"], report)
    md_path = storage.write_text(paths["markdown"], markdown)
    return {"json": str(json_path), "markdown": str(md_path)}


def _band_text(summary: dict[str, Any]) -> str | None:
    band = summary.get("flag_rate_band")
    return f"[{band[0]:.4%}, {band[1]:.4%}] ({summary.get('flag_rate_band_level', 0.99):.0%})" if band else None


def write_evaluation_report(
    summary: dict[str, Any], directory: Path, stem: str, title: str, context: dict[str, Any], plots: bool = True
) -> dict[str, str]:
    """Write one evaluation report as JSON and Markdown, with its PNG plots unless ``plots`` is False; return paths."""
    images = _plot_report(summary, directory, stem, title) if plots else {}
    reasons = summary.get("reasons") or {}
    drift = summary.get("drift")
    anomaly = anomaly_class_metrics(summary)
    report = {"kind": "evaluation", **context, **summary, "anomaly_class": anomaly, "images": images}
    sections: dict[str, Any] = {
        "Summary": {
            **context,
            "rows scored": summary["rows_scored"],
            "rows flagged": summary["rows_flagged"],
            "rows without a label": summary.get("rows_unlabelled", 0) if summary.get("labels") else None,
            "flag rate": summary["flag_rate"],
            "expected flag rate": summary["expected_flag_rate"],
            "flag rate band of an all-normal batch": _band_text(summary),
            "verdict": summary.get("flag_rate_verdict"),
            "threshold": summary["threshold"],
            **({"alarm": ", ".join(summary["alarm_reasons"]) or "no"} if "alarm_reasons" in summary else {}),
        }
    }
    if summary.get("labels"):
        sections["Per class (label column present)"] = classification_table(summary["labels"])
        (tn, fp), (fn, tp) = summary["labels"]["confusion_matrix"]["rows_true_columns_predicted"]
        sections["Confusion matrix"] = [
            {"true \\ predicted": "normal", "normal": tn, "anomaly": fp},
            {"true \\ predicted": "anomaly", "normal": fn, "anomaly": tp},
        ]
        sections["Ranking quality (anomaly class)"] = {
            "ROC-AUC": anomaly.get("roc_auc"),
            "PR-AUC": anomaly.get("pr_auc"),
        }
    if reasons.get("rows_flagged"):
        sections["Why rows were flagged (most frequent first reason)"] = [
            {
                "feature": row["feature"],
                "reason_1 rows": row["reason_1_rows"],
                "share of flagged rows": row["reason_1_share_of_flagged"],
                "mean share of error": row["mean_share"],
            }
            for row in reasons["table"][:15]
        ]
    if summary.get("unseen_categories"):
        sections["Categorical values unseen in training (scored in the unseen slot)"] = [
            {"feature": name, "values": count} for name, count in summary["unseen_categories"].items()
        ]
    if drift:
        sections[
            "Drift against the training rows "
            f"(PSI, {drift['rows_sampled_for_features']:,} rows sampled for the features)"
        ] = drift_table(drift)
    markdown = render_markdown(title, sections, [str(directory / name) for name in images.values()])
    written = write_report_files(report, markdown, directory, stem)
    return {**written, **{kind: str(directory / name) for kind, name in images.items()}}


def _plot_report(summary: dict[str, Any], directory: Path, stem: str, title: str) -> dict[str, str]:
    """Draw a report's error histogram, and its reasons and drift where it has them; return the images' names."""
    images = {"error_histogram": plot_error_histogram(summary, directory / f"{stem}-error-histogram.png", title).name}
    reasons = summary.get("reasons") or {}
    if reasons.get("rows_flagged"):
        images["reasons"] = plot_reasons(
            reasons, directory / f"{stem}-reasons.png", f"Why rows were flagged: {title}"
        ).name
    drift = summary.get("drift")
    if drift:
        images["drift"] = plot_drift(
            drift, directory / f"{stem}-drift.png", f"Drift against the training rows: {title}"
        ).name
    return images
