"""What is published always agrees with what was scored: after changes, failures, kills and late files.

Others can read what is published, too.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.workspace import Workspace
from tests.conftest import FEATURES, RUN_DATE, make_rows, write_rows
from tests.test_operations import _cli, _kill_when

pytestmark = pytest.mark.slow


def _record(ws: Workspace, day: dt.date, batch: str) -> dict | None:
    path = ws.state_dir / "scored" / f"date={day}" / f"{batch}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _output_versions(ws: Workspace, day: dt.date, batch: str) -> set[str]:
    versions = set()
    for kind in ("flagged", "scores"):
        path = ws.output_partition(kind, day) / f"{batch}.parquet"
        if path.exists():
            versions |= set(pq.read_table(path, columns=["model_version"]).column("model_version").to_pylist())
    return versions


def test_every_published_file_and_folder_gets_the_permissions_of_the_umask(harness, workspace_copy):
    from flows.retrain import retrain_flow
    from flows.score import score_flow

    ws = Workspace.at(workspace_copy)
    write_rows(make_rows(3000, 41, anomaly_share=0.01), ws.incoming_for(RUN_DATE) / "night.parquet")
    # What the run writes is what is new, or replaced (a new inode under an old name, as current.json is).
    existing = {p: p.stat().st_ino for p in workspace_copy.rglob("*")}
    previous = os.umask(0o027)
    try:
        retrain_flow(workspace=str(workspace_copy), epochs=2, seed=3)
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    finally:
        os.umask(previous)
    files, folders = [], []
    for path in workspace_copy.rglob("*"):
        if "locks" in path.parts or existing.get(path) == path.stat().st_ino:
            continue
        (folders if path.is_dir() else files).append(path)
    kinds = {p.name for p in files}
    assert {
        "bundle.json",
        "model.keras",
        "current.json",
        "night.parquet",
        "run-report.json",
        "run-report-error-histogram.png",
        "night.json",
    } <= kinds
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o640}
    assert not wrong, f"files not 0640 under umask 027: {wrong}"
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders if stat.S_IMODE(p.stat().st_mode) != 0o750}
    assert not wrong, f"folders not 0750 under umask 027: {wrong}"


def test_a_forced_rerun_with_another_model_killed_half_way_is_scored_again_by_the_next_plain_run(
    harness, workspace_copy, tmp_path
):
    from flows.score import score_flow
    from tests.test_bundle import copy_version

    ws = Workspace.at(workspace_copy)
    current = json.loads((ws.models_dir / "current.json").read_text())["model_version"]
    other = "20270101T000000Z"
    copy_version(ws.models_dir, current, other)
    write_rows(make_rows(600_000, 42), ws.incoming_for(RUN_DATE) / "big.parquet", row_group_size=50_000)
    score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert _record(ws, RUN_DATE, "big")["model_version"] == current

    process = _cli(
        "score",
        "--run-date",
        RUN_DATE.isoformat(),
        "--model-version",
        other,
        "--force",
        "--chunk-rows",
        "8192",
        workspace=workspace_copy,
        home=tmp_path / "prefect",
    )
    flagged_dir = ws.output_partition("flagged", RUN_DATE)
    _kill_when(process, lambda: any(flagged_dir.glob(".big.parquet.*.tmp")))
    assert _record(ws, RUN_DATE, "big") is None, "the record was withdrawn before any output could be replaced"

    again = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert (again["batches_scored"], again["batches_skipped"]) == (1, 0)
    assert _record(ws, RUN_DATE, "big")["model_version"] == current
    assert _output_versions(ws, RUN_DATE, "big") == {current}
    assert not list(flagged_dir.glob(".*"))


def test_a_scored_file_that_changes_and_is_rejected_has_its_outputs_and_record_withdrawn(harness, workspace_copy):
    from flows.score import BatchesFailedError, score_flow

    ws = Workspace.at(workspace_copy)
    good = write_rows(make_rows(2000, 43), ws.incoming_for(RUN_DATE) / "good.parquet")
    changing = write_rows(make_rows(2000, 44, start_id=5000), ws.incoming_for(RUN_DATE) / "changing.parquet")
    score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert _record(ws, RUN_DATE, "changing") is not None

    changing.write_bytes(b"PAR1 no longer parquet")
    with pytest.raises(BatchesFailedError, match=r"1 of 1 batch\(es\) failed") as caught:
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert caught.value.outcome["batches_skipped"] == 1
    assert _record(ws, RUN_DATE, "changing") is None
    assert not any(
        (ws.output_partition(kind, RUN_DATE) / "changing.parquet").exists()
        for kind in ("flagged", "scores", "quarantine")
    )
    rejection = json.loads((ws.output_partition("rejected", RUN_DATE) / "changing.json").read_text())
    assert rejection["code"] == "unreadable" and rejection["size"] == changing.stat().st_size
    scores = pq.read_table(ws.output_partition("scores", RUN_DATE)).to_pandas()
    assert set(scores["batch"]) == {"good"} and len(scores) == 2000
    run_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    assert run_report["rows_scored"] == 2000 and run_report["batches"] == ["good"]
    assert good.exists()


def test_no_scores_removes_the_batchs_earlier_scores_and_the_run_counts_only_what_it_scored(harness, workspace_copy):
    from flows.score import score_flow

    ws = Workspace.at(workspace_copy)
    write_rows(make_rows(1500, 45), ws.incoming_for(RUN_DATE) / "a.parquet")
    score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert (ws.output_partition("scores", RUN_DATE) / "a.parquet").exists()
    outcome = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, force=True, write_scores=False)
    assert not (ws.output_partition("scores", RUN_DATE) / "a.parquet").exists()
    assert outcome["rows_scored"] == 1500 and outcome["scores_dir"] is None
    assert _record(ws, RUN_DATE, "a")["outputs"]["scores"] is None


def test_a_task_that_crashes_fails_its_batch_and_the_run_still_reports(harness, workspace_copy, monkeypatch):
    from prefect.states import Crashed

    import flows.fanout
    from flows.score import BatchesFailedError, score_flow

    ws = Workspace.at(workspace_copy)
    for i in range(3):
        write_rows(make_rows(1000, 46 + i, start_id=i * 1000), ws.incoming_for(RUN_DATE) / f"p{i}.parquet")
    real = flows.fanout.settle_groups

    def second_crashes(*args, **kwargs):
        outcomes = real(*args, **kwargs)
        outcomes[1] = Crashed(message="the worker process was killed")
        return outcomes

    monkeypatch.setattr(flows.fanout, "settle_groups", second_crashes)
    with pytest.raises(BatchesFailedError, match="the worker process was killed") as caught:
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    outcome = caught.value.outcome
    assert (outcome["batches_scored"], outcome["batches_failed"], outcome["rows_scored"]) == (2, 1, 2000)
    assert outcome["failed"][0]["batch"] == "p1"
    assert (
        _record(ws, RUN_DATE, "p1") is None and not (ws.output_partition("flagged", RUN_DATE) / "p1.parquet").exists()
    )
    run_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    assert run_report["failed_batches"][0]["batch"] == "p1"


def test_a_transient_read_error_is_retried_and_a_corrupt_file_is_not(harness, workspace_copy, monkeypatch):
    import data.parquet
    import models.scoring.batch
    from flows.score import BatchesFailedError, score_flow

    ws = Workspace.at(workspace_copy)
    flaky = write_rows(make_rows(1000, 50), ws.incoming_for(RUN_DATE) / "flaky.parquet")
    # Whole numbers compress, so damage inside a page breaks its decompression:
    # pyarrow raises OSError, without an errno.
    table = make_rows(20_000, 51)
    table = pa.table(
        {
            name: pa.array(np.round(table.column(name).to_numpy())) if name in FEATURES else table.column(name)
            for name in table.column_names
        }
    )
    whole = write_rows(table, ws.incoming_for(RUN_DATE) / "corrupt.parquet").read_bytes()
    middle = len(whole) // 3
    (ws.incoming_for(RUN_DATE) / "corrupt.parquet").write_bytes(whole[:middle] + b"\xff" * 400 + whole[middle + 400 :])
    real_open, real_stream = data.parquet.pq.ParquetFile, models.scoring.batch.stream_batch_file
    failures = {"flaky": 1}
    attempts = {"flaky": 0, "corrupt": 0}

    def open_failing_once(path, *args, **kwargs):
        # The streaming open, when the file is scored; the planning before it reads the footer only.
        if Path(path) == flaky and kwargs.get("pre_buffer") is False and failures["flaky"]:
            failures["flaky"] -= 1
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    def counted(bundle, source, batch, *args, **kwargs):
        attempts[batch] += 1
        return real_stream(bundle, source, batch, *args, **kwargs)

    monkeypatch.setattr(data.parquet.pq, "ParquetFile", open_failing_once)
    monkeypatch.setattr(models.scoring.batch, "stream_batch_file", counted)
    with pytest.raises(BatchesFailedError) as caught:
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert attempts == {"flaky": 2, "corrupt": 1}
    assert caught.value.outcome["batches_scored"] == 1
    assert [f["batch"] for f in caught.value.outcome["failed"]] == ["corrupt"]
    assert caught.value.outcome["failed"][0]["code"] == "corrupt"


def test_late_files_of_earlier_dates_are_caught_up_under_their_own_dates(harness, workspace_copy):
    from flows.score import BatchesFailedError, score_flow

    ws = Workspace.at(workspace_copy)
    yesterday, earlier, too_old = (
        RUN_DATE - dt.timedelta(days=1),
        RUN_DATE - dt.timedelta(days=2),
        RUN_DATE - dt.timedelta(days=5),
    )
    write_rows(make_rows(1000, 60), ws.incoming_for(yesterday) / "on_time.parquet")
    broken = ws.incoming_for(yesterday) / "replaced.parquet"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not parquet yet")
    with pytest.raises(BatchesFailedError):
        score_flow(workspace=str(workspace_copy), run_date=yesterday, catch_up_days=0)
    write_rows(make_rows(700, 61, start_id=10_000), ws.incoming_for(yesterday) / "late.parquet")
    write_rows(make_rows(300, 62, start_id=20_000), broken)
    still_broken = ws.incoming_for(earlier) / "still_broken.parquet"
    still_broken.parent.mkdir(parents=True, exist_ok=True)
    still_broken.write_bytes(b"never parquet")
    with pytest.raises(BatchesFailedError):
        score_flow(workspace=str(workspace_copy), run_date=earlier, catch_up_days=0)
    write_rows(make_rows(100, 63), ws.incoming_for(too_old) / "too_old.parquet")
    write_rows(make_rows(2000, 64, start_id=30_000), ws.incoming_for(RUN_DATE) / "tonight.parquet")

    outcome = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert outcome["catch_up_batches"] == [
        {"date": yesterday.isoformat(), "batch": "late"},
        {"date": yesterday.isoformat(), "batch": "replaced"},
    ]
    assert outcome["rows_scored"] == 2000 and outcome["batches_scored"] == 1
    late_scores = pq.read_table(ws.output_partition("scores", yesterday)).to_pandas()
    assert sorted(set(late_scores["batch"])) == ["late", "on_time", "replaced"] and len(late_scores) == 2000
    assert _record(ws, yesterday, "late") and _record(ws, yesterday, "replaced")
    assert not (ws.output_partition("rejected", yesterday) / "replaced.json").exists()
    assert (ws.output_partition("rejected", earlier) / "still_broken.json").exists(), (
        "an unchanged rejected file is not tried again"
    )
    assert not ws.output_partition("scores", too_old).exists(), "dates beyond catch_up_days are left alone"
    yesterday_report = json.loads((ws.output_partition("reports", yesterday) / "run-report.json").read_text())
    assert yesterday_report["rows_scored"] == 2000 and sorted(yesterday_report["batches"]) == [
        "late",
        "on_time",
        "replaced",
    ]
    tonight_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    assert tonight_report["catch_up_batches"] == outcome["catch_up_batches"]

    again = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert again["catch_up_batches"] == [] and again["batches_skipped"] == 1
