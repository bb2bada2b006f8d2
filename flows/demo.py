"""Demo flow: write the tutorial's dataset, retrain on it, score its test split as one night."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from data.workspace import Workspace, default_workspace, resolve_run_date
from flows.retrain import retrain_flow
from flows.score import DEFAULT_TIMEZONE, score_flow
from models.config import PresetName
from tasks.demo import write_demo_data


@flow(name="anomaly-demo", flow_run_name="demo-{preset}")
def demo_flow(
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    preset: Annotated[PresetName, Field(json_schema_extra={"title": "Preset"})] = "default",
    run_date: Annotated[dt.date | None, Field(json_schema_extra={"title": "Run date"})] = None,
    n_batches: Annotated[int, Field(ge=1, le=100, json_schema_extra={"title": "Number of batch files"})] = 4,
) -> dict[str, Any]:
    """Run the whole product on the tutorial's dataset: write it, retrain, score one night with the model just trained.

    Args:
        workspace: Root folder the demo writes its training data, batches, model and outputs into;
            the default comes from $ANOMALY_WORKSPACE, else ./workspace.
        preset: Model recipe to retrain with: 'default' or 'seed' (the tutorial's recipe).
        run_date: Date the test split is filed and scored under. Empty or not given means today in
            $ANOMALY_TIMEZONE, else UTC.
        n_batches: Number of files the test split is cut into.
    """
    root = str(Workspace.at(workspace).root)
    date = resolve_run_date(run_date, DEFAULT_TIMEZONE)
    write_demo_data(root, date, n_batches)
    trained = retrain_flow(workspace=root, preset=preset)
    # The night is scored with the model just trained, even when the promotion gate kept a better one current.
    scored = score_flow(
        workspace=root, run_date=date, force=True, model_version=trained["model_version"], catch_up_days=0
    )
    return {
        **scored,
        "promoted": trained["promoted"],
        "promotion_refused": trained["promotion_refused"],
        "percentile": trained["percentile"],
        "training_report": trained["report"],
        "model_dir": trained["model_dir"],
    }
