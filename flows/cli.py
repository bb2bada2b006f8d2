"""The ``anomaly`` command: run the demo, retraining or scoring flow and end with one JSON line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from data.parquet import DEFAULT_CHUNK_ROWS, DEFAULT_MAX_BAD_ROW_SHARE
from data.workspace import WORKSPACE_ENV, default_workspace
from models.config import PRESET_NAMES

PROMOTE_LOCK_TIMEOUT_S = 600.0

# Prefect's embedded server migrates its database on first start; on two slow cores that can exceed the 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Nothing outside the machine is reachable from a typical batch host; telemetry would only log failures.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2026-11-28") from None


def _add_workspace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=default_workspace(), help=f"root folder of all runtime files (default: ${WORKSPACE_ENV} or ./workspace; now %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="anomaly", description="Autoencoder anomaly detection as Prefect flows. Each command ends with one JSON line summarising the run.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,retrain,score,evaluate,models,promote,alerts}")

    demo = commands.add_parser("demo", help="write the tutorial's dataset, retrain and score one night", description="Write the tutorial's dataset into the workspace, retrain on its training split and score its test split as one night's batches.")
    _add_workspace(demo)
    demo.add_argument("--preset", choices=PRESET_NAMES, default="default", help="model recipe (default: %(default)s; 'seed' is the tutorial's)")
    demo.add_argument("--run-date", type=_date, default=None, help="date the test split is filed and scored under (default: today, UTC)")
    demo.add_argument("--batches", type=int, default=4, help="number of files the test split is cut into (default: %(default)s)")

    retrain = commands.add_parser("retrain", help="retrain the autoencoder and fix the threshold", description="Retrain on normal-labelled rows; fix the threshold at a percentile of held-out normal rows' reconstruction error; save and promote a model version.")
    _add_workspace(retrain)
    retrain.add_argument("--training-data", default=None, help="training Parquet file, folder or glob (default: <workspace>/training)")
    retrain.add_argument("--preset", choices=PRESET_NAMES, default="default", help="model recipe (default: %(default)s)")
    retrain.add_argument("--percentile", type=float, default=98.0, help="threshold percentile of held-out normal errors (default: %(default)s)")
    retrain.add_argument("--label-column", default="label", help="label column of the training data (default: %(default)s)")
    retrain.add_argument("--normal-label", default="0", help="label value of normal rows, compared as text (default: %(default)s)")
    retrain.add_argument("--all-rows-normal", action="store_true", help="the training data has no label column and every row is normal")
    retrain.add_argument("--holdout-fraction", type=float, default=0.2, help="share of normal rows held out to fix the threshold (default: %(default)s)")
    retrain.add_argument("--epochs", type=int, default=None, help="override the preset's maximum epochs")
    retrain.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    retrain.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    retrain.add_argument("--seed", type=int, default=None, help="override the preset's random seed")
    retrain.add_argument("--no-promote", dest="promote", action="store_false", help="save the model version without making it current")
    retrain.add_argument("--use-label-history", action="store_true", help="also train on past nights' rows that labels in <workspace>/labels/ confirm normal, and hold out those they confirm anomalous")
    retrain.add_argument("--label-history-days", type=int, default=30, help="nights, ending today (UTC), the label history reaches back (default: %(default)s)")
    retrain.add_argument("--id-column", dest="id_columns", action="append", default=None, help="column identifying a row in the labels and the nights' files; repeat for several (default: row_id)")

    score = commands.add_parser("score", help="score the batches of a date", description="Score incoming/YYYY-MM-DD/*.parquet (or explicit paths) with the current model; write flagged rows, scores and reports.")
    _add_workspace(score)
    score.add_argument("--run-date", type=_date, default=None, help="date to score, YYYY-MM-DD (default: today in --timezone)")
    score.add_argument("--timezone", default=None, help="IANA time zone deciding 'today' (default: $ANOMALY_TIMEZONE or UTC)")
    score.add_argument("paths", nargs="*", help="explicit Parquet files, folders or globs to score instead of incoming/YYYY-MM-DD/")
    score.add_argument("--force", action="store_true", help="score batches again even if the current model already scored them")
    score.add_argument("--no-scores", dest="write_scores", action="store_false", help="do not write every row's score (outputs/scores/)")
    score.add_argument("--model-version", default=None, help="model version to use (default: models/current.json)")
    score.add_argument("--catch-up-days", type=int, default=3, help="also score files of this many earlier dates that have no record yet, under their own dates; 0 turns it off (default: %(default)s)")
    score.add_argument("--reason-count", type=int, default=3, help="features each flagged row names as its reasons, 0 to 10 (default: %(default)s)")
    score.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows read and scored at a time (default: %(default)s)")
    score.add_argument("--max-bad-row-share", type=float, default=DEFAULT_MAX_BAD_ROW_SHARE, help="share of rows with missing/infinite features above which a batch fails (default: %(default)s)")
    score.add_argument("--dask-workers", type=int, default=0, help="score on a local Dask cluster of this many worker processes (default: 0, no Dask)")
    score.add_argument("--dask-threads-per-worker", type=int, default=1, help="threads of each local Dask worker (default: %(default)s)")
    score.add_argument("--dask-address", default=None, help="score on an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: $ANOMALY_DASK_ADDRESS, or no Dask)")
    score.add_argument("--rows-per-unit", type=int, default=1_000_000, help="on Dask, split files into units of whole row groups of about this many rows (default: %(default)s)")

    evaluate = commands.add_parser(
        "evaluate",
        help="join labels that arrived later to what was scored and report realised quality",
        description="Join the label files in <workspace>/labels/ to the scores outputs of the last --window-days dates by id; write each date's realised "
        "precision, recall, F1, ROC-AUC and PR-AUC per model version under outputs/evaluation/ and a trend report.",
    )
    _add_workspace(evaluate)
    evaluate.add_argument("--end-date", type=_date, default=None, help="last scored date evaluated, YYYY-MM-DD (default: today in --timezone)")
    evaluate.add_argument("--window-days", type=int, default=30, help="scored dates evaluated, ending at --end-date (default: %(default)s)")
    evaluate.add_argument("--id-column", dest="id_columns", action="append", default=None, help="column identifying a row in the labels and the scores outputs; repeat for several (default: row_id)")
    evaluate.add_argument("--timezone", default=None, help="IANA time zone deciding 'today' (default: $ANOMALY_TIMEZONE or UTC)")

    models = commands.add_parser("models", help="list model versions, the current one and their promotion decisions", description="List every model version in the workspace with its threshold, whether it is current, and its promotion gate's decision.")
    _add_workspace(models)

    promote = commands.add_parser("promote", help="make a model version current (roll back or forward)", description="Point models/current.json at VERSION after checking that its bundle loads. Use it to roll back to an earlier version.")
    _add_workspace(promote)
    promote.add_argument("version", help="model version folder name, e.g. 20261128T112156Z (see: anomaly models)")

    commands.add_parser(
        "alerts",
        help="create or update the alerting automations on the Prefect server",
        description="Create or update, by name, the automations that notify on an alarmed night, a failed or crashed run and a missing nightly run, "
        "on the server PREFECT_API_URL points at. Notifications go to $ANOMALY_ALERT_WEBHOOK_URL (Slack-compatible JSON); without it none are sent.",
    )
    return parser


def _run_model_command(command: str, args: argparse.Namespace) -> dict[str, Any]:
    from data.locks import retraining_lock
    from data.workspace import Workspace
    from models.bundle import current_version, list_versions, load_bundle, promote

    workspace = Workspace.at(args.workspace)
    models_dir = workspace.models_dir
    if command == "models":
        return {"versions": list_versions(models_dir), "current": current_version(models_dir, required=False)}
    load_bundle(workspace.version_dir(args.version))
    # A retraining run may be about to promote its own version: wait for it rather than race it.
    with retraining_lock(workspace, timeout_s=PROMOTE_LOCK_TIMEOUT_S):
        previous = current_version(models_dir, required=False)
        promote(models_dir, args.version)
    return {"model_version": args.version, "previous_version": previous}


def _run(command: str, args: argparse.Namespace) -> dict[str, Any]:
    if command == "alerts":
        from flows.automations import apply_automations

        outcome = apply_automations()
        if outcome["warning"]:
            print(f"warning: {outcome['warning']}", file=sys.stderr)
        return outcome
    if command in ("models", "promote"):
        return _run_model_command(command, args)
    if command == "evaluate":
        from flows.evaluate import evaluate_flow
        from flows.parameters import DEFAULT_TIMEZONE

        return evaluate_flow(workspace=args.workspace, end_date=args.end_date, window_days=args.window_days, id_columns=args.id_columns or ["row_id"], timezone=args.timezone or DEFAULT_TIMEZONE)
    if command == "demo":
        from flows.demo import demo_flow

        return demo_flow(workspace=args.workspace, preset=args.preset, run_date=args.run_date, n_batches=args.batches)
    if command == "retrain":
        from flows.retrain import retrain_flow

        return retrain_flow(
            workspace=args.workspace,
            training_data=args.training_data,
            preset=args.preset,
            percentile=args.percentile,
            label_column=args.label_column,
            normal_label=args.normal_label,
            all_rows_normal=args.all_rows_normal,
            holdout_fraction=args.holdout_fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            promote=args.promote,
            use_label_history=args.use_label_history,
            label_history_days=args.label_history_days,
            id_columns=args.id_columns or ["row_id"],
        )
    from flows.score import DEFAULT_TIMEZONE, score_flow

    return score_flow(
        workspace=args.workspace,
        run_date=args.run_date,
        batch_paths=args.paths,
        force=args.force,
        write_scores=args.write_scores,
        model_version=args.model_version,
        timezone=args.timezone or DEFAULT_TIMEZONE,
        catch_up_days=args.catch_up_days,
        reason_count=args.reason_count,
        chunk_rows=args.chunk_rows,
        max_bad_row_share=args.max_bad_row_share,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        dask_threads_per_worker=args.dask_threads_per_worker,
        rows_per_unit=args.rows_per_unit,
    )


SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "retrain": (
        "model_version", "promoted", "promotion_refused", "promotion_warnings", "promote_command", "current_model", "preset", "threshold", "percentile",
        "threshold_warning", "threshold_scheme", "validation_rows", "training_rows", "holdout_anomalies", "label_history", "epochs_run", "fit_seconds",
        "holdout_recall", "holdout_roc_auc", "model_dir", "report",
    ),
    "models": ("current", "versions"),
    "promote": ("model_version", "previous_version"),
    "alerts": ("api_url", "automations", "notifications", "warning"),
    "evaluate": ("first_date", "last_date", "dates_evaluated", "label_files", "label_rows", "evaluation_dir", "trend_report", "evaluations"),
    "score": ("date", "model_version", "threshold", "rows_read", "rows_scored", "rows_flagged", "rows_quarantined", "rows_unlabelled", "flag_rate", "expected_flag_rate", "flag_rate_band", "flag_rate_verdict", "alarm", "alarm_reasons", "precision", "recall", "f1", "roc_auc", "pr_auc", "batches_scored", "batches_skipped", "batches_failed", "catch_up_batches", "flagged_dir", "scores_dir", "report", "failed"),
}
SUMMARY_KEYS["demo"] = SUMMARY_KEYS["score"] + ("promoted", "promotion_refused", "percentile", "model_dir", "training_report")


def main(argv: Sequence[str] | None = None, run: Callable[[str, argparse.Namespace], dict[str, Any]] = _run) -> int:
    """Parse ``argv``, run the flow, print one JSON summary line; return the exit code."""
    args = build_parser().parse_args(argv)
    from data.errors import AnomalyJobError

    status, code = "completed", 0
    try:
        outcome = run(args.command, args)
    except AnomalyJobError as exc:
        outcome = getattr(exc, "outcome", {})
        status, code = "failed", 1
        print(f"error: {exc}", file=sys.stderr)
    except Exception as exc:  # a parameter Prefect refused, or an unexpected failure: either way the JSON line follows
        from prefect.exceptions import ParameterTypeError

        outcome = {}
        if isinstance(exc, ParameterTypeError):
            status, code = "failed", 2
            print(f"error: {exc}", file=sys.stderr)
        else:
            status, code = "crashed", 1
            traceback.print_exc(file=sys.stderr)
            print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    summary = {"command": args.command, "status": status, **{k: outcome[k] for k in SUMMARY_KEYS[args.command] if k in outcome}}
    print(json.dumps(summary, default=str), flush=True)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
