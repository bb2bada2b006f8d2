"""A night of good and bad files, killed runs, concurrent runs and escaping paths: nothing lost, nothing doubled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import ParameterError
from data.workspace import Workspace
from tests.conftest import RUN_DATE, make_rows, write_rows

pytestmark = pytest.mark.slow


def bad_input_night(folder: Path) -> dict[str, int | None]:
    """Write good files and one file of each kind of bad input; return each file's row count (None: unreadable)."""
    rows: dict[str, int | None] = {}

    def put(name: str, table: pa.Table) -> None:
        write_rows(table, folder / f"{name}.parquet")
        rows[name] = table.num_rows

    put("good_a", make_rows(1000, 1, start_id=0))
    put("good_b", make_rows(1000, 2, start_id=1000))
    base = make_rows(300, 3, start_id=2000)
    put(
        "ints",
        base.set_column(1, "f0", pa.array(np.round(base.column("f0").to_numpy() * 3).astype(np.int32))).set_column(
            0, "row_id", pa.array(np.arange(2600, 2900))
        ),
    )
    f32 = base.set_column(2, "f1", base.column("f1").cast(pa.float32()))
    put("float32", f32)
    put(
        "float32_as_float64",
        f32.set_column(2, "f1", f32.column("f1").cast(pa.float64())).set_column(
            0, "row_id", pa.array(np.arange(2300, 2600))
        ),
    )
    nullable = make_rows(200, 4, start_id=3000)
    put(
        "nullable",
        nullable.set_column(
            3,
            "f2",
            pa.array(
                [None if i % 40 == 0 else v for i, v in enumerate(nullable.column("f2").to_pylist())], type=pa.float64()
            ),
        ),
    )
    nan_rows = make_rows(200, 5, start_id=4000)
    values = nan_rows.column("f5").to_numpy().copy()
    values[[3, 4, 5]] = [np.nan, np.inf, -np.inf]
    put("nan_rows", nan_rows.set_column(6, "f5", pa.array(values)))
    mostly_bad = make_rows(100, 6, start_id=5000)
    put("mostly_bad", mostly_bad.set_column(1, "f0", pa.array([np.nan] * 60 + [0.0] * 40)))
    put("empty", make_rows(10, 7).slice(0, 0))
    put("missing_column", make_rows(50, 8).drop_columns(["f3"]))
    put("text_column", make_rows(50, 9).set_column(5, "f4", pa.array([f"{i}" for i in range(50)])))
    put("duplicate_column", make_rows(50, 10).append_column("f2", pa.array(np.zeros(50))))
    (folder / "not_parquet.parquet").write_text("id,f0\n1,2\n")
    rows["not_parquet"] = None
    whole = pq.write_table(make_rows(500, 11), folder / "whole.tmp") or (folder / "whole.tmp").read_bytes()
    (folder / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.tmp").unlink()
    rows["truncated"] = None
    return rows


EXPECTED_REJECTIONS = {
    "mostly_bad": ("too_many_bad_rows", None),
    "empty": ("empty", None),
    "missing_column": ("missing_column", "f3"),
    "text_column": ("non_numeric_column", "f4"),
    "duplicate_column": ("duplicate_column", "f2"),
    "not_parquet": ("unreadable", None),
    "truncated": ("unreadable", None),
}


def test_a_night_of_good_and_bad_files_scores_every_good_row_once_and_accounts_for_every_row(harness, workspace_copy):
    from flows.score import BatchesFailedError, score_flow

    ws = Workspace.at(workspace_copy)
    rows = bad_input_night(ws.incoming_for(RUN_DATE))
    with pytest.raises(BatchesFailedError, match=r"7 of 14 batch\(es\) failed") as caught:
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    outcome = caught.value.outcome

    rejected_dir = ws.output_partition("rejected", RUN_DATE)
    for name, (code, column) in EXPECTED_REJECTIONS.items():
        record = json.loads((rejected_dir / f"{name}.json").read_text())
        assert record["code"] == code, name
        assert record["column"] == column, name
        assert f"{name}.parquet" in record["error"], name
        assert not (ws.output_partition("flagged", RUN_DATE) / f"{name}.parquet").exists()
        assert not (ws.state_dir / "scored" / f"date={RUN_DATE}" / f"{name}.json").exists()

    scored_names = set(rows) - set(EXPECTED_REJECTIONS)
    scores = pq.read_table(ws.output_partition("scores", RUN_DATE)).to_pandas()
    quarantine = pq.read_table(
        ws.output_partition("quarantine", RUN_DATE), columns=["row_id", "reason_code", "batch"]
    ).to_pandas()
    assert scores["row_id"].is_unique
    assert set(scores["batch"]) == scored_names
    assert len(quarantine) == 5 + 3
    assert outcome["rows_read"] == sum(rows[n] for n in scored_names)
    assert outcome["rows_scored"] + outcome["rows_quarantined"] == outcome["rows_read"]
    assert outcome["rows_scored"] == len(scores)
    run_report = json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text())
    readable_rejected = sum(f["rows_in_file"] for f in run_report["failed_batches"] if f["rows_in_file"] is not None)
    assert run_report["rows_read"] + readable_rejected == sum(r for r in rows.values() if r is not None)
    # Compatible types are cast: float32 features score exactly as the same values stored as float64.
    by_batch = scores.set_index("batch")
    np.testing.assert_array_equal(
        by_batch.loc["float32", "reconstruction_error"].to_numpy(),
        by_batch.loc["float32_as_float64", "reconstruction_error"].to_numpy(),
    )


def _cli(*args: str, workspace: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args, "--workspace", str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PREFECT_HOME": str(home)},
    )


def _kill_when(process: subprocess.Popen, ready, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, f"process ended before it could be killed: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _outputs(ws: Workspace) -> dict[str, pa.Table]:
    tables = {}
    for kind in ("flagged", "scores"):
        table = pq.read_table(ws.output_partition(kind, RUN_DATE))
        keep = [c for c in table.column_names if c not in ("scored_at", "date")]
        tables[kind] = table.select(keep).sort_by("row_id")
    return tables


def test_a_scoring_run_killed_mid_write_leaves_nothing_partial_and_the_rerun_equals_a_clean_run(
    harness, workspace_copy, tmp_path
):
    from flows.score import score_flow

    ws = Workspace.at(workspace_copy)
    write_rows(
        make_rows(1_500_000, 12, anomaly_share=0.01), ws.incoming_for(RUN_DATE) / "big.parquet", row_group_size=100_000
    )
    write_rows(make_rows(2000, 13, start_id=2_000_000), ws.incoming_for(RUN_DATE) / "small.parquet")
    clean = tmp_path / "clean"
    shutil.copytree(workspace_copy, clean)
    score_flow(workspace=str(clean), run_date=RUN_DATE)

    flagged_dir = ws.output_partition("flagged", RUN_DATE)
    process = _cli(
        "score",
        "--run-date",
        RUN_DATE.isoformat(),
        "--chunk-rows",
        "8192",
        workspace=workspace_copy,
        home=tmp_path / "prefect",
    )
    _kill_when(process, lambda: flagged_dir.is_dir() and any(flagged_dir.glob(".big.parquet.*.tmp")))
    assert not (flagged_dir / "big.parquet").exists()
    assert not (ws.output_partition("scores", RUN_DATE) / "big.parquet").exists()
    assert not (ws.state_dir / "scored" / f"date={RUN_DATE}" / "big.json").exists()

    score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert not list(flagged_dir.glob(".*.tmp"))
    ours, theirs = _outputs(ws), _outputs(Workspace.at(clean))
    for kind in ("flagged", "scores"):
        assert ours[kind].equals(theirs[kind]), kind


def test_a_retraining_run_killed_midway_changes_nothing_and_the_next_run_cleans_up(harness, workspace_copy, tmp_path):
    from flows.retrain import retrain_flow
    from models.bundle import current_version, load_bundle

    ws = Workspace.at(workspace_copy)
    before = current_version(ws.models_dir)
    process = _cli("retrain", "--epochs", "500", workspace=workspace_copy, home=tmp_path / "prefect")
    _kill_when(process, lambda: any(ws.models_dir.glob("*.partial/_work/holdout.parquet")))
    assert current_version(ws.models_dir) == before
    assert list(ws.models_dir.glob("*.partial"))
    assert {p.name for p in ws.models_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial")} == {before}

    result = retrain_flow(workspace=str(workspace_copy), epochs=3, promote=False)
    assert not list(ws.models_dir.glob("*.partial"))
    assert load_bundle(ws.version_dir(result["model_version"])).version == result["model_version"]
    assert current_version(ws.models_dir) == before


def score_twice_at_once(workspace: str | Path, tmp_path: Path) -> list[dict]:
    """Run two scoring processes of RUN_DATE at the same time and return their outcomes.

    It first checks that one scored and one skipped every batch.
    """
    first = _cli("score", "--run-date", RUN_DATE.isoformat(), workspace=workspace, home=tmp_path / "p1")
    second = _cli("score", "--run-date", RUN_DATE.isoformat(), workspace=workspace, home=tmp_path / "p2")
    outcomes = []
    for process in (first, second):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["batches_scored"] for o in outcomes) == [0, 3]
    assert sorted(o["batches_skipped"] for o in outcomes) == [0, 3]
    return outcomes


def test_two_scoring_processes_of_the_same_date_write_every_row_once(workspace_copy, tmp_path):
    ws = Workspace.at(workspace_copy)
    for i in range(3):
        write_rows(make_rows(50_000, 20 + i, start_id=i * 50_000), ws.incoming_for(RUN_DATE) / f"part-{i}.parquet")
    score_twice_at_once(workspace_copy, tmp_path)
    scores = pq.read_table(ws.output_partition("scores", RUN_DATE)).to_pandas()
    assert len(scores) == 150_000 and scores["row_id"].is_unique


def test_parameters_cannot_reach_outside_the_workspace(harness, workspace_copy):
    from flows.score import score_flow

    write_rows(make_rows(100, 1), Workspace.at(workspace_copy).incoming_for(RUN_DATE) / "a.parquet")
    with pytest.raises(ParameterError, match=r"model_version='\.\./\.\./etc' is not a plain name"):
        score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, model_version="../../etc")
    assert not (Workspace.at(workspace_copy).outputs_dir).exists()
