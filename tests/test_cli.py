from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import typing

import pytest

from data.errors import ParameterError
from flows.cli import FLOW_COMMANDS, build_parser, main
from flows.cli_options import docstring_args, value_type


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("demo", ["--workspace", "--preset", "--run-date", "--batches"]),
        (
            "retrain",
            [
                "--training-data", "--preset", "--percentile", "--label-column", "--normal-label", "--all-rows-normal",
                "--holdout-fraction", "--epochs", "--batch-size", "--learning-rate", "--seed", "--no-promote",
                "--use-label-history", "--label-history-days", "--id-column",
            ],
        ),
        (
            "score",
            [
                "--run-date", "--timezone", "--catch-up-days", "--reason-count", "--force", "--no-scores",
                "--model-version", "--chunk-rows", "--max-bad-row-share", "--dask-workers", "--dask-threads-per-worker",
                "--dask-address", "--rows-per-unit",
            ],
        ),
        ("evaluate", ["--workspace", "--end-date", "--window-days", "--id-column", "--timezone"]),
        ("alerts", []),
    ],
)
def test_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


def _plain_type(annotation):
    kind = value_type(annotation)
    return (list, value_type(typing.get_args(kind)[0])) if typing.get_origin(kind) is list else kind


# Flow parameters without a default are options the command requires.
REQUIRED_OPTIONS = {"backfill": {"--start-date": "2026-11-01", "--end-date": "2026-11-03"}}


@pytest.mark.parametrize("command", sorted(FLOW_COMMANDS))
def test_every_flow_parameter_is_an_option_defaulting_to_the_flow_default(command):
    spec = FLOW_COMMANDS[command]
    function = getattr(importlib.import_module(spec.module), spec.function).fn
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function, include_extras=True)
    required = REQUIRED_OPTIONS.get(command, {})
    parsed = build_parser().parse_args([command, *(word for option in required.items() for word in option)])
    arguments = spec.arguments(parsed)
    assert arguments.keys() == signature.parameters.keys()
    for name, parameter in signature.parameters.items():
        if parameter.default is inspect.Parameter.empty:
            assert str(arguments[name]) == required[f"--{name.replace('_', '-')}"], name
        else:
            assert arguments[name] == parameter.default, name
    documented = docstring_args(function.__doc__)
    for read in spec.parameters():
        assert _plain_type(read.annotation) == _plain_type(hints[read.name]), read.name
        assert read.doc and read.doc == documented[read.name], (
            f"{function.__name__}'s docstring has no Args entry for {read.name}"
        )


def test_the_commands_own_spellings_reach_the_flow_parameters():
    parser = build_parser()
    demo = FLOW_COMMANDS["demo"].arguments(parser.parse_args(["demo", "--batches", "7"]))
    assert demo["n_batches"] == 7
    retrain = FLOW_COMMANDS["retrain"].arguments(
        parser.parse_args(["retrain", "--no-promote", "--id-column", "a", "--id-column", "b"])
    )
    assert (retrain["promote"], retrain["id_columns"], retrain["all_rows_normal"]) == (False, ["a", "b"], False)
    score = FLOW_COMMANDS["score"].arguments(parser.parse_args(["score", "a.parquet", "b/", "--no-scores", "--force"]))
    assert (score["batch_paths"], score["write_scores"], score["force"]) == (["a.parquet", "b/"], False, True)
    evaluate = FLOW_COMMANDS["evaluate"].arguments(
        parser.parse_args(["evaluate", "--end-date", "2026-11-27", "--id-column", "k"])
    )
    assert (str(evaluate["end_date"]), evaluate["id_columns"]) == ("2026-11-27", ["k"])
    assert FLOW_COMMANDS["evaluate"].arguments(parser.parse_args(["evaluate"]))["id_columns"] == ["row_id"]


def test_docstring_args_joins_continuation_lines_and_stops_at_the_next_section():
    doc = """Do it.

    Args:
        first: One line.
        second (int): Two
            lines.

    Returns:
        ignored: Not an argument.
    """
    assert docstring_args(doc) == {"first": "One line.", "second": "Two lines."}


def test_main_ends_with_one_json_summary_line(capsys):
    def fake_run(command, args):
        assert (command, args.percentile, args.preset) == ("retrain", 97.5, "seed")
        return {
            "model_version": "v1",
            "threshold": 0.5,
            "percentile": 97.5,
            "validation_rows": 10,
            "training_rows": 40,
            "model_dir": "/m/v1",
            "unrelated": 1,
        }

    assert main(["retrain", "--preset", "seed", "--percentile", "97.5"], run=fake_run) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary == {
        "command": "retrain",
        "status": "completed",
        "model_version": "v1",
        "threshold": 0.5,
        "percentile": 97.5,
        "validation_rows": 10,
        "training_rows": 40,
        "model_dir": "/m/v1",
    }


def test_main_prints_one_error_line_and_still_a_json_line(capsys):
    def failing_run(command, args):
        raise ParameterError("percentile=150.0 must be strictly between 0 and 100")

    assert main(["retrain", "--percentile", "150"], run=failing_run) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: percentile=150.0 must be strictly between 0 and 100"
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "failed"


def test_unknown_preset_and_bad_date_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["retrain", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--run-date", "28/11/2026"])
    assert "not an ISO date" in capsys.readouterr().err


@pytest.mark.slow
def test_scoring_without_a_model_fails_with_one_clear_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "score", "--workspace", str(tmp_path), "--run-date", "2026-11-27"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PREFECT_HOME": str(tmp_path / "prefect")},
    )
    assert done.returncode == 1
    assert f"error: {tmp_path}/models/current.json: no current model; run the retraining flow first" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "failed"


def test_models_and_promote_roll_back_without_prefect(workspace_copy, capsys):
    from tests.test_bundle import copy_version

    models = workspace_copy / "models"
    first = json.loads((models / "current.json").read_text())["model_version"]
    copy_version(models, first, "20270101T000000Z")
    assert main(["promote", "20270101T000000Z", "--workspace", str(workspace_copy)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "command": "promote",
        "status": "completed",
        "model_version": "20270101T000000Z",
        "previous_version": first,
    }
    assert main(["promote", first, "--workspace", str(workspace_copy)]) == 0
    capsys.readouterr()
    assert main(["models", "--workspace", str(workspace_copy)]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["current"] == first
    assert {v["model_version"] for v in listed["versions"]} == {first, "20270101T000000Z"}


def test_promoting_a_missing_version_fails_with_one_line(workspace_copy, capsys):
    assert main(["promote", "20990101T000000Z", "--workspace", str(workspace_copy)]) == 1
    assert "20990101T000000Z/bundle.json: missing" in capsys.readouterr().err
    assert main(["promote", "../../etc", "--workspace", str(workspace_copy)]) == 1
    assert "not a plain name" in capsys.readouterr().err


def test_an_unexpected_exception_still_ends_with_the_json_line_and_a_traceback(capsys):
    def crashing_run(command, args):
        raise KeyError("surprise")

    assert main(["score", "--run-date", "2026-11-27"], run=crashing_run) == 1
    captured = capsys.readouterr()
    assert "Traceback (most recent call last)" in captured.err and "KeyError: 'surprise'" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"command": "score", "status": "crashed"}


def test_promote_waits_for_a_running_retraining_and_says_so_when_it_does_not_end(workspace_copy, capsys, monkeypatch):
    import flows.cli
    from data.locks import retraining_lock
    from data.workspace import Workspace

    first = json.loads((workspace_copy / "models" / "current.json").read_text())["model_version"]
    monkeypatch.setattr(flows.cli, "PROMOTE_LOCK_TIMEOUT_S", 0.2)
    with retraining_lock(Workspace.at(workspace_copy)):
        assert main(["promote", first, "--workspace", str(workspace_copy)]) == 1
    captured = capsys.readouterr()
    assert "retrain.lock: another run has held this lock" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "failed"
    assert main(["promote", first, "--workspace", str(workspace_copy)]) == 0
