"""Scoring on Dask through prefect-dask gives the same outputs, row for row, as scoring in one process."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.workspace import Workspace
from models.runtime import cpu_threads
from tests.conftest import RUN_DATE, make_rows, write_rows

pytestmark = pytest.mark.slow

VOLATILE = {"scored_at", "quarantined_at", "date"}


def _night(root) -> int:
    folder = Workspace.at(root).incoming_for(RUN_DATE)
    total = 0
    for i in range(3):
        table = make_rows(60_000, 30 + i, anomaly_share=0.01, start_id=i * 100_000)
        if i == 1:
            values = table.column("f2").to_numpy().copy()
            values[[5, 25_000, 59_999]] = np.nan
            table = table.set_column(3, "f2", pa.array(values))
        write_rows(table, folder / f"part-{i}.parquet", row_group_size=10_000)
        total += table.num_rows
    write_rows(make_rows(3_000, 40, start_id=900_000), folder / "small.parquet")
    return total + 3_000


def _tables(root, kind):
    table = pq.read_table(Workspace.at(root).output_partition(kind, RUN_DATE))
    return table.select([c for c in table.column_names if c not in VOLATILE]).sort_by(
        [("batch", "ascending"), ("row_id", "ascending")]
    )


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _record(ws: Workspace, batch: str) -> dict:
    """A batch's manifest record without what differs between two workspaces."""
    return _without(
        json.loads((ws.state_dir / "scored" / f"date={RUN_DATE}" / f"{batch}.json").read_text()),
        "recorded_at",
        "source",
        "outputs",
    )


def test_two_dask_workers_score_a_night_exactly_as_one_process(harness, workspace_copy, tmp_path):
    from flows.score import score_flow

    single, on_dask = workspace_copy, tmp_path / "dask"
    rows = _night(single)
    shutil.copytree(single, on_dask)

    alone = score_flow(workspace=str(single), run_date=RUN_DATE)
    # TensorFlow's float32 results can differ in the last digit with its number of threads; the workers
    # get as many as this process has, so that any difference would come from the units and their join.
    spread = score_flow(
        workspace=str(on_dask),
        run_date=RUN_DATE,
        dask_workers=2,
        dask_threads_per_worker=cpu_threads(),
        rows_per_unit=20_000,
    )

    assert alone["rows_read"] == spread["rows_read"] == rows
    for key in ("rows_scored", "rows_flagged", "rows_quarantined", "flag_rate", "batches_scored"):
        assert alone[key] == spread[key], key
    for kind in ("flagged", "scores", "quarantine"):
        ours, theirs = _tables(single, kind), _tables(on_dask, kind)
        # pandas' equals treats NaN in the same place as equal; the quarantined rows hold NaN on purpose.
        assert ours.schema.equals(theirs.schema) and ours.to_pandas().equals(theirs.to_pandas()), kind
    assert _tables(single, "quarantine").num_rows == 3

    ws_single, ws_dask = Workspace.at(single), Workspace.at(on_dask)
    for name in ("part-0", "part-1", "part-2", "small"):
        ours = json.loads((ws_single.output_partition("reports", RUN_DATE) / "batches" / f"{name}.json").read_text())
        theirs = json.loads((ws_dask.output_partition("reports", RUN_DATE) / "batches" / f"{name}.json").read_text())
        assert _without(ours, "source") == _without(theirs, "source"), name
        assert _record(ws_single, name) == _record(ws_dask, name), name
    run = lambda ws: _without(  # noqa: E731
        json.loads((ws.output_partition("reports", RUN_DATE) / "run-report.json").read_text()), "images"
    )
    assert run(ws_single) == run(ws_dask)
    assert not (ws_dask.state_dir / "parts" / f"date={RUN_DATE}").exists() or not any(
        (ws_dask.state_dir / "parts" / f"date={RUN_DATE}").iterdir()
    )

    again = score_flow(workspace=str(on_dask), run_date=RUN_DATE, dask_workers=2, rows_per_unit=20_000)
    assert again["batches_skipped"] == 4 and again["rows_scored"] == rows - 3


def test_a_unit_that_fails_once_is_retried_and_nothing_is_lost(harness, workspace_copy, monkeypatch):
    import models.scoring.batch
    from flows.score import score_flow

    rows = _night(workspace_copy)
    real = models.scoring.batch.stream_batch_file
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "disk went away for a moment")
        return real(*args, **kwargs)

    monkeypatch.setattr(models.scoring.batch, "stream_batch_file", flaky)
    outcome = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE)
    assert calls["n"] == 5  # four files, one of them twice
    assert outcome["batches_failed"] == 0 and outcome["rows_read"] == rows
    assert _tables(workspace_copy, "scores")["row_id"].to_pandas().is_unique


@pytest.fixture(scope="module")
def faulty_cluster(tmp_path_factory):
    """A 2-process LocalCluster whose workers take the faults a test asks for (tests/dask_faults.py).

    Dask gives up on a unit after its second lost worker (the default is four), which keeps the poison test short.
    """
    import dask
    from distributed import LocalCluster

    faults = tmp_path_factory.mktemp("dask-faults")
    preload = str(Path(__file__).with_name("dask_faults.py"))
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"DASK_FAULTS_DIR": str(faults)},
            preload=[preload],
        ) as cluster,
    ):
        yield cluster.scheduler_address, faults


def _every_row_once(root, rows: int) -> None:
    ids = _tables(root, "scores")["row_id"].to_pandas()
    assert len(ids) == rows - 3 and ids.is_unique  # the 3 NaN rows are quarantined, not scored
    assert _tables(root, "quarantine").num_rows == 3
    parts = Workspace.at(root).state_dir / "parts" / f"date={RUN_DATE}"
    assert not parts.exists() or not any(parts.iterdir())


@pytest.mark.parametrize("fault", ["exit", "oserror", "merge-oserror", "merge-exit"])
def test_a_lost_worker_or_a_failing_unit_or_merge_is_retried_on_dask(
    harness, workspace_copy, faulty_cluster, fault, monkeypatch
):
    from flows.fanout import DASK_ADDRESS_ENV
    from flows.score import score_flow

    address, faults = faulty_cluster
    rows = _night(workspace_copy)
    (faults / fault).touch()
    if fault == "oserror":
        # The address from the environment: only that cluster's workers can take the fault.
        monkeypatch.setenv(DASK_ADDRESS_ENV, address)
        outcome = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, rows_per_unit=20_000)
    else:
        outcome = score_flow(
            workspace=str(workspace_copy), run_date=RUN_DATE, dask_address=address, rows_per_unit=20_000
        )

    # A merge retried, or run again after its worker died, still has its units' part files.
    assert not (faults / fault).exists(), "the fault never struck"
    assert outcome["batches_failed"] == 0 and outcome["batches_scored"] == 4
    assert outcome["rows_read"] == rows and outcome["rows_scored"] + outcome["rows_quarantined"] == rows
    _every_row_once(workspace_copy, rows)


def test_a_unit_that_keeps_killing_its_worker_fails_its_file_alone_and_a_rerun_completes_the_night(
    harness, workspace_copy, faulty_cluster
):
    from flows.score import BatchesFailedError, score_flow

    address, faults = faulty_cluster
    rows = _night(workspace_copy)
    poison = faults / "poison-part-1"
    poison.touch()
    try:
        with pytest.raises(BatchesFailedError) as failure:
            score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, dask_address=address, rows_per_unit=30_000)
    finally:
        poison.unlink()
    outcome = failure.value.outcome
    assert outcome["batches_scored"] == 3 and [f["batch"] for f in outcome["failed"]] == ["part-1"]
    assert outcome["failed"][0]["code"] == "KilledWorker" and "workers died" in outcome["failed"][0]["error"]
    ws = Workspace.at(workspace_copy)
    assert sorted(p.stem for p in (ws.state_dir / "scored" / f"date={RUN_DATE}").glob("*.json")) == [
        "part-0",
        "part-2",
        "small",
    ]
    assert "part-1" not in set(_tables(workspace_copy, "scores")["batch"].to_pylist())
    assert (ws.output_partition("rejected", RUN_DATE) / "part-1.json").exists()

    rerun = score_flow(workspace=str(workspace_copy), run_date=RUN_DATE, dask_address=address, rows_per_unit=30_000)
    assert rerun["batches_scored"] == 1 and rerun["batches_skipped"] == 3 and rerun["rows_read"] == rows
    _every_row_once(workspace_copy, rows)
    assert not (ws.output_partition("rejected", RUN_DATE) / "part-1.json").exists()


def test_the_command_line_scores_on_local_dask_workers_that_report_to_its_own_server(workspace_copy, tmp_path):
    import os
    import subprocess
    import sys

    rows = _night(workspace_copy)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "score",
            "--workspace",
            str(workspace_copy),
            "--run-date",
            RUN_DATE.isoformat(),
            "--dask-workers",
            "2",
            "--rows-per-unit",
            "20000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["rows_read"] == rows and outcome["batches_scored"] == 4 and outcome["batches_failed"] == 0
    _every_row_once(workspace_copy, rows)
    # Without a configured API, only the command's process starts a temporary Prefect server; the workers use it.
    assert (done.stdout + done.stderr).count("Starting temporary server") == 1, done.stderr[-3000:]
