from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.metrics import classification_report

from data import storage
from data.batches import (
    Batch,
    already_scored,
    awaits_scoring,
    batch_name,
    find_batches,
    withdraw_record,
    write_record,
    write_rejection,
)
from data.errors import NoBatchesError, ParameterError
from data.workspace import Workspace, check_path_part, resolve_run_date
from models.evaluation.reports import render_markdown
from models.monitoring.error_summary import classification_report_from_confusion, combine, summarize_errors
from tests.conftest import RUN_DATE, make_rows, write_rows


def test_find_batches_lists_the_dates_files(tmp_path):
    ws = Workspace.at(tmp_path)
    write_rows(make_rows(10, 0), ws.incoming_for(RUN_DATE) / "b.parquet")
    write_rows(make_rows(10, 1), ws.incoming_for(RUN_DATE) / "sub" / "a.parquet")
    assert [b.name for b in find_batches(ws, RUN_DATE)] == ["b", "sub__a"]


def test_find_batches_says_where_it_looked(tmp_path):
    with pytest.raises(NoBatchesError, match=r"incoming/2026-11-27: no .parquet batches for run_date=2026-11-27"):
        find_batches(Workspace.at(tmp_path), RUN_DATE)
    with pytest.raises(NoBatchesError, match="batch_paths entry"):
        find_batches(Workspace.at(tmp_path), RUN_DATE, [str(tmp_path / "none.parquet")])


def test_find_batches_refuses_two_files_with_the_same_output_name(tmp_path):
    a = write_rows(make_rows(10, 0), tmp_path / "x" / "n.parquet")
    b = write_rows(make_rows(10, 0), tmp_path / "y" / "n.parquet")
    with pytest.raises(ParameterError, match="would both write outputs named 'n'"):
        find_batches(Workspace.at(tmp_path), RUN_DATE, [str(a), str(b)])


def test_batch_name_is_safe():
    from pathlib import Path

    assert batch_name(Path("/x/a b;c.parquet")) == "a_b_c"
    assert batch_name(Path("/in/d/sub/x.parquet"), Path("/in/d")) == "sub__x"


def test_manifest_skips_only_unchanged_batches_scored_by_the_same_model(tmp_path):
    ws = Workspace.at(tmp_path)
    path = write_rows(make_rows(10, 0), tmp_path / "in" / "n.parquet")
    batch = Batch("n", path)
    assert not already_scored(ws, RUN_DATE, batch, "v1")
    write_record(ws, RUN_DATE, batch, "v1", storage.fingerprint(path), {"rows_scored": 10})
    assert already_scored(ws, RUN_DATE, batch, "v1")
    assert not already_scored(ws, RUN_DATE, batch, "v2")
    write_rows(make_rows(10, 1), path)
    os.utime(path, ns=(1, 1))
    assert not already_scored(ws, RUN_DATE, batch, "v1")
    assert withdraw_record(ws, RUN_DATE, "n") and not withdraw_record(ws, RUN_DATE, "n")


def test_a_record_of_an_older_format_is_scored_again(tmp_path):
    ws = Workspace.at(tmp_path)
    path = write_rows(make_rows(10, 0), tmp_path / "in" / "n.parquet")
    record = write_record(ws, RUN_DATE, Batch("n", path), "v1", storage.fingerprint(path), {})
    storage.write_json(record, {**storage.read_json(record), "format": 1})
    assert not already_scored(ws, RUN_DATE, Batch("n", path), "v1")


def test_late_files_await_scoring_until_recorded_and_a_rejected_file_until_it_is_replaced(tmp_path):
    ws = Workspace.at(tmp_path)
    path = write_rows(make_rows(10, 0), ws.incoming_for(RUN_DATE) / "late.parquet")
    batch = Batch("late", path)
    assert awaits_scoring(ws, RUN_DATE, batch)
    write_rejection(ws, RUN_DATE, batch, {"code": "corrupt", "error": "x"})
    assert not awaits_scoring(ws, RUN_DATE, batch), "a file rejected as it is now is not retried every night"
    write_rows(make_rows(11, 1), path)
    assert awaits_scoring(ws, RUN_DATE, batch), "a file replaced after its rejection is caught up"
    write_record(ws, RUN_DATE, batch, "v1", storage.fingerprint(path), {})
    assert not awaits_scoring(ws, RUN_DATE, batch)
    assert not (ws.output_partition("rejected", RUN_DATE) / "late.json").exists(), "a scored file is rejected no more"


@pytest.mark.parametrize("bad", ["..", "../x", "/etc", "a/b", ""])
def test_path_parts_cannot_escape_the_workspace(bad):
    with pytest.raises(ParameterError, match="not a plain name"):
        check_path_part(bad, "batch")


def test_resolve_run_date_uses_the_timezone_and_names_a_bad_one_even_with_a_date():
    assert resolve_run_date(RUN_DATE, "Europe/Paris") == RUN_DATE
    assert resolve_run_date(None, "UTC") is not None
    for run_date in (None, RUN_DATE):
        with pytest.raises(ParameterError, match="timezone='Mars/Olympus'"):
            resolve_run_date(run_date, "Mars/Olympus")


def test_metrics_from_confusion_match_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.random(1000) < 0.1
    predicted = rng.random(1000) < 0.15
    expected = classification_report(truth, predicted, output_dict=True, zero_division=0)
    tn, fp = int((~truth & ~predicted).sum()), int((~truth & predicted).sum())
    fn, tp = int((truth & ~predicted).sum()), int((truth & predicted).sum())
    ours = classification_report_from_confusion([[tn, fp], [fn, tp]])
    for ours_name, their_name in (("normal", "False"), ("anomaly", "True")):
        for key in ("precision", "recall", "f1-score"):
            assert ours[ours_name][key] == pytest.approx(expected[their_name][key])


def test_combined_summaries_add_up_to_the_whole():
    rng = np.random.default_rng(1)
    errors = rng.exponential(size=2000)
    truth = (rng.random(2000) < 0.05).astype(np.int8)
    whole = summarize_errors(errors, 3.0, 98.0, truth)
    parts = [summarize_errors(errors[s], 3.0, 98.0, truth[s]) for s in (slice(0, 700), slice(700, 2000))]
    combined = combine(parts, 3.0, 98.0)
    assert combined["rows_scored"] == 2000 and combined["rows_flagged"] == whole["rows_flagged"]
    assert combined["histogram"]["counts"] == whole["histogram"]["counts"]
    assert combined["labels"]["confusion_matrix"] == whole["labels"]["confusion_matrix"]
    assert combined["labels"]["classification_report"]["anomaly"]["recall"] == pytest.approx(
        whole["labels"]["classification_report"]["anomaly"]["recall"]
    )


def test_summary_without_labels_has_no_label_metrics_and_markdown_renders_tables():
    summary = summarize_errors(np.linspace(0, 1, 100), 0.5, 98.0, None)
    assert summary["labels"] is None and summary["rows_flagged"] == 50
    text = render_markdown("T", {"Summary": {"rows": 100, "rate": 0.25}, "Rows": [{"a": 1, "b": 2.0}]})
    assert "| rows | 100 |" in text and "| a | b |" in text and "| 1 | 2 |" in text
