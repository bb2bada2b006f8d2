"""Task that writes the tutorial's dataset into the workspace."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data.demo import write_demo_dataset
from data.workspace import Workspace


@task(name="write-demo-dataset", cache_policy=NO_CACHE)
def write_demo_data(workspace_root: str, run_date: dt.date, n_batches: int) -> dict[str, Any]:
    """Write the tutorial's training split and one night's test batches."""
    dataset = write_demo_dataset(Workspace.at(workspace_root), run_date, n_batches=n_batches)
    get_run_logger().info(
        "Demo data: %d training rows, %d test rows (%d anomalies) in %d batches",
        dataset.training_rows,
        dataset.test_rows,
        dataset.test_anomalies,
        len(dataset.batch_files),
    )
    return {
        "training_file": str(dataset.training_file),
        "batch_files": [str(p) for p in dataset.batch_files],
        "test_rows": dataset.test_rows,
        "test_anomalies": dataset.test_anomalies,
    }
