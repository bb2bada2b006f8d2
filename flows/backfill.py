"""Backfill flow: score a range of past dates in order with one model, through the scoring flow, one date at a time."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from data.errors import AnomalyJobError, NoBatchesError, ParameterError
from data.workspace import Workspace, default_workspace
from flows.parameters import RUN_DATE_SCHEMA
from flows.score import BatchesFailedError, score_flow
from models.scoring.run_summary import backfill_date, backfill_outcome
from tasks.scoring import count_unscored_batches, resolve_model_version

MAX_BACKFILL_DAYS = 3660


class BackfillFailedError(AnomalyJobError):
    """Some dates of a backfill had batches that failed; the other dates were scored, and ``outcome`` lists each."""

    def __init__(self, message: str, outcome: dict[str, Any]):
        super().__init__(message)
        self.outcome = outcome


@flow(name="backfill-scores", flow_run_name="backfill-{start_date}-to-{end_date}", timeout_seconds=24 * 3600)
def backfill_flow(
    start_date: Annotated[dt.date, RUN_DATE_SCHEMA, Field(json_schema_extra={"title": "First date"})],
    end_date: Annotated[dt.date, RUN_DATE_SCHEMA, Field(json_schema_extra={"title": "Last date"})],
    workspace: Annotated[str, Field(min_length=1, json_schema_extra={"title": "Workspace"})] = default_workspace(),
    force: Annotated[bool, Field(json_schema_extra={"title": "Force re-scoring"})] = False,
    model_version: Annotated[
        Annotated[str, Field(min_length=1)] | None, Field(json_schema_extra={"title": "Model version"})
    ] = None,
    write_scores: Annotated[bool, Field(json_schema_extra={"title": "Write every row's score"})] = True,
) -> dict[str, Any]:
    """Score each date from the first to the last in order, skipping dates the model already scored.

    Args:
        start_date: First date scored (incoming/YYYY-MM-DD/).
        end_date: Last date scored, the first one or later.
        workspace: Root folder of every runtime file (training/, incoming/, models/, outputs/, state/);
            the default comes from $ANOMALY_WORKSPACE, else ./workspace.
        force: Score again dates, and batches, that the model already scored.
        model_version: Model version to score every date with. Empty or not given means the current one
            (models/current.json) when the backfill starts.
        write_scores: Also write every row's score (outputs/scores/) for joining back.
    """
    logger = get_run_logger()
    days = (end_date - start_date).days + 1
    if not 1 <= days <= MAX_BACKFILL_DAYS:
        raise ParameterError(
            f"end_date={end_date} must be start_date={start_date} or later, and at most {MAX_BACKFILL_DAYS} days on"
        )
    root = str(Workspace.at(workspace).root)
    # One model for the whole range, even if another is promoted meanwhile.
    model = resolve_model_version(workspace_root=root, model_version=model_version)
    logger.info("Backfilling %d date(s), %s to %s, with model %s", days, start_date, end_date, model.version)
    dates = []
    for number, day in enumerate(start_date + dt.timedelta(days=k) for k in range(days)):
        found, unscored = count_unscored_batches(workspace_root=root, run_date=day, model_version=model.version)
        # A rerun after a kill passes quickly over the dates it finished: each of their batches is recorded.
        if not found or (not unscored and not force):
            dates.append(backfill_date(day, "no_batches" if not found else "already_scored"))
        else:
            dates.append(_score_date(root=root, day=day, version=model.version, force=force, write_scores=write_scores))
        done = dates[-1]
        logger.info(
            "Date %d/%d, %s: %s (%s rows scored)", number + 1, days, day, done["status"], done["rows_scored"] or 0
        )
    outcome = backfill_outcome(start_date, end_date, model.version, dates)
    if outcome["dates_failed"]:
        raise BackfillFailedError(
            f"{len(outcome['dates_failed'])} of {days} date(s) had batches that failed: {outcome['dates_failed']}; "
            "the others were scored, and a rerun retries only what is not published",
            outcome,
        )
    return outcome


def _score_date(root: str, day: dt.date, version: str, force: bool, write_scores: bool) -> dict[str, Any]:
    """Score one date through the scoring flow; return its line of the backfill."""
    try:
        outcome = score_flow(
            workspace=root, run_date=day, force=force, model_version=version, write_scores=write_scores, catch_up_days=0
        )
    except BatchesFailedError as exc:
        return backfill_date(day, "failed", exc.outcome)
    except NoBatchesError:
        # The folder emptied between the count and the run.
        return backfill_date(day, "no_batches")
    return backfill_date(day, "scored", outcome)
