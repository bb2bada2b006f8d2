"""Why a row was flagged: each feature's share of the row's reconstruction error, and which way the input is off.

The error is the mean over features of each residual's square (MSE) or absolute value (MAE), on the
scale the model computes it (standardised inputs for the default preset); a feature's share is its
term over the sum of all terms, so the shares of a row sum to 1 and decompose its score exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIGH, LOW, UNUSUAL = "high", "low", "unusual"
# Shares are summed as integers in units of 2**-32, so that a file's tally is the same to the last
# digit however its rows are grouped (in chunks, or in units on Dask workers).
SHARE_UNITS = 2**32


@dataclass
class RowReasons:
    """The top reasons of each flagged row, strongest first."""

    features: np.ndarray  # (rows, k) feature names
    indices: np.ndarray  # (rows, k) the same features, as column indices
    shares: np.ndarray  # (rows, k) float64
    directions: np.ndarray  # (rows, k) "high" or "low"
    all_shares: np.ndarray  # (rows, features) every feature's share


def explain_rows(
    residuals: np.ndarray,
    loss: str,
    feature_names: Sequence[str],
    reason_count: int,
    categorical: Collection[str] = (),
) -> RowReasons:
    """Return the ``reason_count`` largest shares of each row's error, from its residuals (input - reconstruction).

    A ``categorical`` feature's direction is ``unusual``: its value is not the one its row's others predict.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    terms = np.square(residuals) if loss == "mse" else np.abs(residuals)
    totals = terms.sum(axis=1, keepdims=True)
    shares = np.divide(terms, totals, out=np.zeros_like(terms), where=totals > 0)
    k = min(reason_count, residuals.shape[1])
    # Stable, so that equal shares keep the features' order.
    top = np.argsort(-shares, axis=1, kind="stable")[:, :k]
    names = np.asarray(feature_names, dtype=object)
    return RowReasons(
        features=names[top],
        indices=top,
        shares=np.take_along_axis(shares, top, axis=1),
        directions=np.where(
            np.isin(top, [j for j, name in enumerate(feature_names) if name in categorical]),
            UNUSUAL,
            np.where(np.take_along_axis(residuals, top, axis=1) > 0, HIGH, LOW),
        ),
        all_shares=shares,
    )


@dataclass
class ReasonTally:
    """Over a set of flagged rows: how often each feature is the first reason, and the sum of its shares.

    It is mergeable exactly.
    """

    features: list[str]
    first: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    share_units: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: int = 0

    def __post_init__(self) -> None:
        if len(self.first) != len(self.features):
            self.first = np.zeros(len(self.features), dtype=np.int64)
            self.share_units = np.zeros(len(self.features), dtype=np.int64)

    def add(self, reasons: RowReasons) -> None:
        """Count the reasons of one chunk of flagged rows, explained over this tally's features in its order."""
        if reasons.all_shares.shape[1:] != (len(self.features),):
            raise ValueError("cannot add reasons over different features to a tally")
        if not len(reasons.all_shares):
            return
        self.first += np.bincount(reasons.indices[:, 0], minlength=len(self.features))
        self.share_units += np.rint(reasons.all_shares * SHARE_UNITS).astype(np.int64).sum(axis=0)
        self.rows += len(reasons.all_shares)

    def merge(self, other: ReasonTally) -> ReasonTally:
        """Add another tally over the same features into this one and return it."""
        if other.features != self.features:
            raise ValueError("cannot add reason tallies over different features")
        self.first += other.first
        self.share_units += other.share_units
        self.rows += other.rows
        return self

    def to_json(self) -> dict[str, Any]:
        """Return the tally as JSON: per feature, rows where it is reason_1 and its mean share, most frequent first."""
        table = [
            {
                "feature": name,
                "reason_1_rows": int(self.first[i]),
                "reason_1_share_of_flagged": float(self.first[i] / self.rows) if self.rows else 0.0,
                "mean_share": float(self.share_units[i] / SHARE_UNITS / self.rows) if self.rows else 0.0,
            }
            for i, name in enumerate(self.features)
        ]
        table.sort(key=lambda row: (-row["reason_1_rows"], -row["mean_share"], row["feature"]))
        return {
            "rows_flagged": self.rows,
            "features": self.features,
            "first": self.first.tolist(),
            "share_units": self.share_units.tolist(),
            "table": table,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ReasonTally:
        """Rebuild a tally written by :meth:`to_json`."""
        return cls(
            list(payload["features"]),
            np.asarray(payload["first"], dtype=np.int64),
            np.asarray(payload["share_units"], dtype=np.int64),
            int(payload["rows_flagged"]),
        )
