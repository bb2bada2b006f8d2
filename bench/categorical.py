"""Categorical features: a transactions table whose normal rows tie the currency to the country.

The planted anomalies break only that tie; their numbers are ordinary. Retrained and scored through the
flows with the text columns as categorical features, beside a model of the numeric columns only (which
cannot see the tie). Figures: ROC-AUC and PR-AUC of the night, the share of flagged planted anomalies
whose first reason is ``currency`` or ``country``, and scoring throughput with categorical features and
missing values against the numeric path on the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.nights import best_rows_per_second, ranking, retrain_and_score

CURRENCY_OF = {"DE": "EUR", "FR": "EUR", "IT": "EUR", "JP": "JPY", "US": "USD", "GB": "GBP", "CH": "CHF"}
TEXT_COLUMNS = ("country", "currency")
MISSING_SHARE = 0.05


def transactions(n: int, seed: int, anomaly_share: float = 0.0, start_id: int = 0, gaps: bool = False) -> pa.Table:
    """Return ``n`` transactions: ordinary numbers, a country and its currency; anomalies pay in another currency.

    With ``gaps``, MISSING_SHARE of the amounts and of the countries are null.
    """
    rng = np.random.default_rng(seed)
    countries = rng.choice(list(CURRENCY_OF), size=n)
    currencies = np.array([CURRENCY_OF[c] for c in countries], dtype=object)
    labels = (rng.random(n) < anomaly_share).astype(np.int64)
    others = sorted(set(CURRENCY_OF.values()))
    for i in np.flatnonzero(labels):
        currencies[i] = rng.choice([c for c in others if c != currencies[i]])
    amount_gaps = rng.random(n) < MISSING_SHARE if gaps else None
    country_gaps = rng.random(n) < MISSING_SHARE if gaps else None
    return pa.table(
        {
            "row_id": pa.array(np.arange(start_id, start_id + n), type=pa.int64()),
            "txn_id": pa.array([f"t-{start_id + i:08d}" for i in range(n)]),
            "amount": pa.array(rng.lognormal(3.0, 0.6, size=n), mask=amount_gaps),
            "items": rng.poisson(3.0, size=n).astype(np.int64),
            "hour": rng.normal(13.0, 3.5, size=n),
            "basket_share": rng.beta(2.0, 5.0, size=n),
            "country": pa.array(countries.tolist(), mask=country_gaps).dictionary_encode(),
            "currency": pa.array(currencies.tolist()),
            "label": labels,
        }
    )


def numeric_only(table: pa.Table) -> pa.Table:
    """Return ``table`` without its text columns: what a model of the numbers alone reads."""
    return table.drop_columns(["txn_id", *TEXT_COLUMNS])


def through_the_flows(workspace: Path, train: pa.Table, night: pa.Table) -> dict[str, Any]:
    """Retrain on ``train`` (every row normal) and score ``night``; return the ranking and the reasons' figures."""
    run = retrain_and_score(workspace, train, night, all_rows_normal=True)
    scores = run.scores
    flagged = run.flagged()
    planted = flagged[flagged["label"] == 1]
    return {
        **ranking(scores["label"].to_numpy(), scores["reconstruction_error"].to_numpy()),
        "rows_scored": run.scored["rows_scored"],
        "rows_quarantined": run.scored["rows_quarantined"],
        "recall": float(len(planted) / max(1, int((scores["label"] == 1).sum()))),
        "reason_1_tie_share": float(planted["reason_1"].isin(TEXT_COLUMNS).mean()) if len(planted) else 0.0,
        "flag_rate_normal": float(scores.loc[scores["label"] == 0, "is_anomaly"].mean()),
        "promoted": run.trained["promoted"],
    }


def categorical(work: Path, scale: float, log) -> dict[str, Any]:
    """The transactions retrained with categorical features and with numbers only; then both scoring paths timed."""
    train = transactions(max(2_000, int(50_000 * scale)), seed=1)
    night = transactions(max(2_000, int(20_000 * scale)), seed=2, anomaly_share=0.02, start_id=10_000_000)
    result: dict[str, Any] = {"train_rows": train.num_rows, "night_rows": night.num_rows}
    for key, (rows, nightly) in {
        "categorical": (train, night),
        "numeric_only": (numeric_only(train), numeric_only(night)),
    }.items():
        result[key] = through_the_flows(work / "categorical" / key, rows, nightly)
        m = result[key]
        log(
            f"categorical features, {key.replace('_', ' ')}: ROC-AUC {m['roc_auc']:.3f}, recall {m['recall']:.2f}, "
            f"reason_1 currency or country for {m['reason_1_tie_share']:.0%} of flagged planted anomalies"
        )
    result["throughput"] = scoring_throughput(work / "categorical", scale, log)
    return result


def scoring_throughput(work: Path, scale: float, log, repeats: int = 3) -> dict[str, Any]:
    """Rows per second through the whole scoring path: categorical features with gaps, and the numbers alone.

    The same rows for both models (the numeric model reads only its columns), timed alternately, best of
    ``repeats``, so that the machine's noise falls on both alike.
    """
    rows = transactions(max(20_000, int(400_000 * scale)), seed=3, anomaly_share=0.02, gaps=True)
    path = work / "throughput.parquet"
    pq.write_table(rows, path)
    rate = best_rows_per_second(
        {key: (work / key, path) for key in ("categorical", "numeric_only")}, rows.num_rows, repeats
    )
    ratio = rate["categorical"] / rate["numeric_only"]
    log(
        f"categorical features, scoring {rows.num_rows:,} rows with {MISSING_SHARE:.0%} gaps: "
        f"{rate['categorical']:,.0f} rows/s, {ratio:.2f} of the numeric path"
    )
    return {"rows": rows.num_rows, "rows_per_second": rate, "ratio_categorical_to_numeric": ratio}


def render(result: dict[str, Any]) -> str:
    """Render the section as a Markdown table with its bars."""
    if not result:
        return ""
    lines = [
        f"Categorical features: transactions whose normal rows tie the currency to the country "
        f"({result['train_rows']:,} training rows, a night of {result['night_rows']:,} with 2% tie-breaking anomalies)",
        "",
        "| model | ROC-AUC | PR-AUC | recall | reason_1 currency or country (flagged planted) | normal flag rate |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("categorical", "numeric_only"):
        m = result[key]
        lines.append(
            f"| {key.replace('_', ' ')} | {m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {m['recall']:.2f} | "
            f"{m['reason_1_tie_share']:.0%} | {m['flag_rate_normal']:.4f} |"
        )
    m, speed = result["categorical"], result["throughput"]
    lines += [
        "",
        "| figure | value | bar |",
        "|---|---|---|",
        f"| ROC-AUC with categorical features | {m['roc_auc']:.3f} | >= 0.95 |",
        f"| flagged planted anomalies whose reason_1 is currency or country | {m['reason_1_tie_share']:.0%} | >= 80% |",
        f"| scoring with categorical features and {MISSING_SHARE:.0%} gaps / the numeric path, same rows | "
        f"{speed['ratio_categorical_to_numeric']:.2f} | >= 0.8 |",
        "",
    ]
    return "\n".join(lines)
