"""The tutorial's dataset, written into a workspace as labelled training Parquet and one night of batches."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import storage
from data.workspace import Workspace

FEATURE_PREFIX = "f"


@dataclass(frozen=True)
class DemoDataset:
    """Where the demo data went and how many rows each part holds."""

    training_file: Path
    batch_files: list[Path]
    training_rows: int
    test_rows: int
    test_anomalies: int


def make_tutorial_data(
    n_samples: int = 100_000,
    n_features: int = 32,
    class_sep: float = 0.5,
    weights: tuple[float, float] = (0.995, 0.005),
    random_state: int = 0,
    n_redundant: int = 0,
    n_informative: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the tutorial's ``make_classification`` data (its defaults reproduce it exactly).

    ``n_redundant`` features are linear combinations of the ``n_informative`` ones (default: all the
    others); any features left over are noise.
    """
    from sklearn.datasets import make_classification

    return make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_features - n_redundant if n_informative is None else n_informative,
        n_redundant=n_redundant,
        n_repeated=0,
        n_classes=2,
        n_clusters_per_class=1,
        weights=list(weights),
        class_sep=class_sep,
        random_state=random_state,
    )


def rows_table(features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> pa.Table:
    """Return a table of ``row_id``, features ``f00..`` and ``label``."""
    columns = {"row_id": pa.array(row_ids, type=pa.int64())}
    width = max(2, len(str(features.shape[1] - 1)))
    for j in range(features.shape[1]):
        columns[f"{FEATURE_PREFIX}{j:0{width}d}"] = pa.array(features[:, j], type=pa.float64())
    columns["label"] = pa.array(labels, type=pa.int64())
    return pa.table(columns)


def write_table(table: pa.Table, path: Path, row_group_rows: int = 1_000_000) -> Path:
    """Write ``table`` to ``path`` atomically."""
    with storage.staged_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
    return path


def write_demo_dataset(
    workspace: Workspace, run_date: dt.date, n_batches: int = 4, n_samples: int = 100_000, random_state: int = 0
) -> DemoDataset:
    """Write the tutorial's 80/20 split: training rows to training/, test rows as batches.

    The test rows become ``n_batches`` files for ``run_date``.
    """
    from sklearn.model_selection import train_test_split

    features, labels = make_tutorial_data(n_samples=n_samples, random_state=random_state)
    row_ids = np.arange(len(labels))
    x_train, x_test, y_train, y_test, id_train, id_test = train_test_split(
        features, labels, row_ids, test_size=0.2, random_state=42
    )
    training_file = write_table(
        rows_table(x_train, y_train, id_train), workspace.training_dir / "demo-training.parquet"
    )
    batch_dir = workspace.incoming_for(run_date)
    batch_files = []
    for i, part in enumerate(np.array_split(np.arange(len(y_test)), n_batches)):
        batch_files.append(
            write_table(rows_table(x_test[part], y_test[part], id_test[part]), batch_dir / f"part-{i:03d}.parquet")
        )
    return DemoDataset(
        training_file=training_file,
        batch_files=batch_files,
        training_rows=len(y_train),
        test_rows=len(y_test),
        test_anomalies=int(y_test.sum()),
    )
