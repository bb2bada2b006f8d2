"""The ``anomaly`` command: run a flow (demo, retrain, score, backfill, evaluate) or a model command; one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from data.workspace import WORKSPACE_ENV, default_workspace
from flows.cli_options import FlowCommand, Spelling

PROMOTE_LOCK_TIMEOUT_S = 600.0

# Prefect's embedded server migrates its database on first start; on two slow cores that can exceed the 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Nothing outside the machine is reachable from a typical batch host; telemetry would only log failures.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Each flow command's options are its flow's parameters (type, default and help from the signature and docstring);
# only the spellings named here differ from --name-with-dashes.
FLOW_COMMANDS: dict[str, FlowCommand] = {
    "demo": FlowCommand("flows.demo", "demo_flow", {"n_batches": Spelling(flag="--batches")}),
    "retrain": FlowCommand("flows.retrain", "retrain_flow", {"id_columns": Spelling(flag="--id-column")}),
    "score": FlowCommand(
        "flows.score",
        "score_flow",
        {"batch_paths": Spelling(positional="paths"), "write_scores": Spelling(flag="--no-scores")},
    ),
    "backfill": FlowCommand("flows.backfill", "backfill_flow", {}),
    "evaluate": FlowCommand("flows.evaluate", "evaluate_flow", {"id_columns": Spelling(flag="--id-column")}),
}


def _add_workspace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default=default_workspace(),
        help=f"root folder of all runtime files (default: ${WORKSPACE_ENV} or ./workspace; now %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="anomaly",
        description="Autoencoder anomaly detection as Prefect flows. "
        "Each command ends with one JSON line summarising the run.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,retrain,score,backfill,evaluate,models,promote,alerts}"
    )

    demo = commands.add_parser(
        "demo",
        help="write the tutorial's dataset, retrain and score one night",
        description="Write the tutorial's dataset into the workspace, retrain on its training split and score its test "
        "split as one night's batches.",
    )
    FLOW_COMMANDS["demo"].add_options(demo)

    retrain = commands.add_parser(
        "retrain",
        help="retrain the autoencoder and fix the threshold",
        description="Retrain on normal-labelled rows; fix the threshold at a percentile of held-out normal rows' "
        "reconstruction error; save and promote a model version.",
    )
    FLOW_COMMANDS["retrain"].add_options(retrain)

    score = commands.add_parser(
        "score",
        help="score the batches of a date",
        description="Score incoming/YYYY-MM-DD/*.parquet (or explicit paths) with the current model; write flagged "
        "rows, scores and reports.",
    )
    FLOW_COMMANDS["score"].add_options(score)

    backfill = commands.add_parser(
        "backfill",
        help="score a range of past dates in order",
        description="Score incoming/YYYY-MM-DD/ of each date from --start-date to --end-date in order with one model, "
        "through the scoring flow; dates that model already scored are skipped (--force scores them again), so a "
        "rerun after a kill resumes at the first date not done.",
    )
    FLOW_COMMANDS["backfill"].add_options(backfill)

    evaluate = commands.add_parser(
        "evaluate",
        help="join labels that arrived later to what was scored and report realised quality",
        description="Join the label files in <workspace>/labels/ to the scores outputs of the last --window-days dates "
        "by id; write each date's realised precision, recall, F1, ROC-AUC and PR-AUC per model version under "
        "outputs/evaluation/ and a trend report.",
    )
    FLOW_COMMANDS["evaluate"].add_options(evaluate)

    models = commands.add_parser(
        "models",
        help="list model versions, the current one and their promotion decisions",
        description="List every model version in the workspace with its threshold, whether it is current, and its "
        "promotion gate's decision.",
    )
    _add_workspace(models)

    promote = commands.add_parser(
        "promote",
        help="make a model version current (roll back or forward)",
        description="Point models/current.json at VERSION after checking that its bundle loads. Use it to roll back "
        "to an earlier version.",
    )
    _add_workspace(promote)
    promote.add_argument("version", help="model version folder name, e.g. 20261128T112156Z (see: anomaly models)")

    commands.add_parser(
        "alerts",
        help="create or update the alerting automations on the Prefect server",
        description="Create or update, by name, the automations that notify on an alarmed night, a failed or crashed "
        "run and a missing nightly run, on the server PREFECT_API_URL points at. Notifications go to "
        "$ANOMALY_ALERT_WEBHOOK_URL (Slack-compatible JSON); without it none are sent.",
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
    return FLOW_COMMANDS[command].run(args)


SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "retrain": (
        "model_version", "promoted", "promotion_refused", "promotion_warnings", "promote_command", "current_model",
        "preset", "threshold", "percentile", "threshold_warning", "threshold_scheme", "validation_rows",
        "training_rows", "holdout_anomalies", "training_rows_read",
        "training_rows_sampled", "ignored_columns", "missing_values_filled",
        "label_history", "epochs_run", "fit_seconds",
        "holdout_recall", "holdout_roc_auc", "model_dir", "report",
    ),
    "models": ("current", "versions"),
    "promote": ("model_version", "previous_version"),
    "alerts": ("api_url", "automations", "notifications", "warning"),
    "evaluate": (
        "first_date", "last_date", "dates_evaluated", "label_files", "label_rows", "evaluation_dir", "trend_report",
        "evaluations",
    ),
    "score": (
        "date", "model_version", "threshold", "rows_read", "rows_scored", "rows_flagged", "rows_quarantined",
        "rows_unlabelled", "flag_rate", "expected_flag_rate", "flag_rate_band", "flag_rate_verdict", "alarm",
        "alarm_reasons", "precision", "recall", "f1", "roc_auc", "pr_auc", "batches_scored", "batches_skipped",
        "batches_failed", "catch_up_batches", "flagged_dir", "scores_dir", "report", "failed",
    ),
}
SUMMARY_KEYS["backfill"] = (
    "start_date", "end_date", "model_version", "dates_scored", "dates_failed", "dates_already_scored",
    "dates_no_batches", "rows_scored", "rows_flagged", "dates",
)
SUMMARY_KEYS["demo"] = SUMMARY_KEYS["score"] + (
    "promoted", "promotion_refused", "percentile", "model_dir", "training_report",
)


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
    summary = {
        "command": args.command,
        "status": status,
        **{k: outcome[k] for k in SUMMARY_KEYS[args.command] if k in outcome},
    }
    print(json.dumps(summary, default=str), flush=True)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
