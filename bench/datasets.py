"""Benchmark data: the tutorial's dataset, other generated datasets, and large float64 batches written in streaming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.demo import make_tutorial_data, rows_table


@dataclass(frozen=True)
class DatasetSpec:
    """One labelled dataset for the quality benchmark."""

    name: str
    n_samples: int
    n_features: int
    class_sep: float
    anomaly_share: float
    random_state: int
    n_redundant: int = 0
    n_informative: int | None = None


TUTORIAL = DatasetSpec("tutorial", 100_000, 32, 0.5, 0.005, 0)
OTHERS = (
    DatasetSpec("sep1.0-f16-seed1", 60_000, 16, 1.0, 0.01, 1),
    DatasetSpec("sep0.8-f48-seed2", 60_000, 48, 0.8, 0.01, 2),
    DatasetSpec("sep0.5-f24-seed3", 60_000, 24, 0.5, 0.02, 3),
    # Features that move together: 24 of the 64 are linear combinations of 8 informative ones, the
    # other 32 are noise. Standardising alone leaves the 8 shared directions dominant, and a network
    # trained on them reconstructs anomalies there too. 150,000 rows, so that its 900 or so test
    # anomalies measure recall to about 0.015.
    DatasetSpec(
        "sep0.8-f64-informative8-redundant24-seed4", 150_000, 64, 0.8, 0.03, 4, n_redundant=24, n_informative=8
    ),
)


def make_dataset(spec: DatasetSpec, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return features and labels of ``spec`` (``scale`` < 1 shrinks it for quick runs)."""
    return make_tutorial_data(
        n_samples=max(20_000, int(spec.n_samples * scale)),
        n_features=spec.n_features,
        class_sep=spec.class_sep,
        weights=(1 - spec.anomaly_share, spec.anomaly_share),
        random_state=spec.random_state,
        n_redundant=spec.n_redundant,
        n_informative=spec.n_informative,
    )


def digits_as_anomaly_sets(
    normal_training_rows: int | None = None,
) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Return scikit-learn's 8x8 digits once per digit: that digit is the anomaly class, the others are normal.

    Each item is ``(digit, x_train, y_train, x_test, y_test)`` with a stratified 80/20 split; the training
    part keeps its normal rows only, the first ``normal_training_rows`` of them when given.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, digits = load_digits(return_X_y=True)
    sets = []
    for digit in range(10):
        labels = (digits == digit).astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=0.2, random_state=42, stratify=labels
        )
        normal = np.flatnonzero(y_train == 0)[:normal_training_rows]
        sets.append((digit, x_train[normal], y_train[normal], x_test, y_test))
    return sets


def write_training_file(features: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Write labelled rows as a training Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_table(features, labels, np.arange(len(labels))), path)
    return path


def normal_class(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean and a Cholesky factor of the covariance of ``features``.

    That is the Gaussian ``write_large_batch`` can draw from.
    """
    return features.mean(axis=0), np.linalg.cholesky(np.cov(features, rowvar=False))


def write_large_batch(
    path: Path,
    n_rows: int,
    n_features: int = 32,
    row_group_rows: int = 262_144,
    seed: int = 0,
    anomaly_share: float | None = None,
    distribution: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write ``n_rows`` of Gaussian float64 features plus ``row_id`` in row groups, never holding the whole file.

    Rows are standard normal, or drawn from ``distribution`` (a mean and Cholesky factor, see
    ``normal_class``) so that a model of that class flags about its usual share of them.
    With ``anomaly_share`` the file also has a ``label`` column (1 for that share of rows, shifted by 2 in
    every feature).
    """
    rng = np.random.default_rng(seed)
    names = [f"f{j:02d}" for j in range(n_features)]
    fields = [pa.field("row_id", pa.int64())] + [pa.field(n, pa.float64()) for n in names]
    schema = pa.schema(fields + ([pa.field("label", pa.int64())] if anomaly_share is not None else []))
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n_rows, row_group_rows):
            n = min(row_group_rows, n_rows - start)
            block = rng.normal(size=(n, n_features))
            if distribution is not None:
                block = distribution[0] + block @ distribution[1].T
            arrays = [pa.array(np.arange(start, start + n, dtype=np.int64))]
            labels = None
            if anomaly_share is not None:
                labels = (rng.random(n) < anomaly_share).astype(np.int64)
                block[labels == 1] += 2.0
            arrays += [pa.array(block[:, j]) for j in range(n_features)]
            if labels is not None:
                arrays.append(pa.array(labels))
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return path
