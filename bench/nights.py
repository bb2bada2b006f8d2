"""One night through the flows, as the benchmark sections run it: retrain on a table, score a night, read the scores.

Also the side-by-side timing of the scoring path the sections share: several models, each on its file,
timed alternately so that the machine's noise falls on all alike.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

NIGHT = dt.date(2026, 1, 1)


def ranking(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC and PR-AUC of the anomaly class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"roc_auc": float(roc_auc_score(labels, scores)), "pr_auc": float(average_precision_score(labels, scores))}


@dataclass(frozen=True)
class NightRun:
    """The retrain and score JSON lines of one night in a workspace, its scores output, and how long retraining took."""

    workspace: Path
    trained: dict[str, Any]
    scored: dict[str, Any]
    scores: pd.DataFrame
    retrain_seconds: float

    def flagged(self) -> pd.DataFrame:
        """Return the night's flagged rows output."""
        return pd.read_parquet(self.workspace / "outputs" / "flagged" / f"date={NIGHT.isoformat()}")


def retrain_and_score(workspace: Path, train: pa.Table, night: pa.Table, **retrain_parameters: Any) -> NightRun:
    """Write ``train`` as the workspace's training data and ``night`` as NIGHT's batch; retrain, then score NIGHT."""
    from flows.retrain import retrain_flow
    from flows.score import score_flow

    (workspace / "training").mkdir(parents=True, exist_ok=True)
    pq.write_table(train, workspace / "training" / "train.parquet")
    folder = workspace / "incoming" / NIGHT.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(night, folder / "night.parquet")
    started = time.perf_counter()
    trained = retrain_flow(workspace=str(workspace), **retrain_parameters)
    retrain_seconds = time.perf_counter() - started
    scored = score_flow(workspace=str(workspace), run_date=NIGHT, force=True, catch_up_days=0)
    scores = pd.read_parquet(workspace / "outputs" / "scores" / f"date={NIGHT.isoformat()}")
    return NightRun(workspace, trained, scored, scores, retrain_seconds)


def best_rows_per_second(files: Mapping[str, tuple[Path, Path]], rows: int, repeats: int) -> dict[str, float]:
    """Score each (workspace, file) pair's file with that workspace's current model, in turn, ``repeats`` times.

    Return each pair's rows per second in its best run: the whole scoring path of one file, outputs included.
    """
    from data.outputs import batch_outputs
    from data.workspace import Workspace
    from models.bundle import current_version, load_bundle
    from models.scoring.batch import score_file
    from models.scoring.streaming import ScoringOptions

    options = ScoringOptions(scored_at=dt.datetime.now(dt.UTC))
    runs = {}
    for key, (workspace, path) in files.items():
        ws = Workspace.at(workspace)
        runs[key] = (ws, load_bundle(ws.version_dir(current_version(ws.models_dir))), path)
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (ws, loaded, path) in runs.items():
            started = time.perf_counter()
            score_file(loaded, path, key, batch_outputs(ws, NIGHT, key), options)
            seconds[key].append(time.perf_counter() - started)
    return {key: rows / min(times) for key, times in seconds.items()}
