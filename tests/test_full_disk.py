"""A full disk fails a run cleanly: the error names the path, nothing partial is published, a rerun completes.

Each case runs on its own small tmpfs, filled so that only part of what a clean run writes still fits,
then freed and run again; the rerun must equal a run that never failed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data.storage import TEMP_MARKER
from data.workspace import Workspace
from tests.conftest import RUN_DATE, make_rows, write_rows
from tests.test_dask import _record, _tables

pytestmark = pytest.mark.slow

DISK_SIZE = "48m"
# Shares of the most a clean run holds on disk at once that are left free, chosen so that the write that fails
# lands at different steps: scoring fails on a batch's outputs, its report or record, or the run report;
# retraining on its working files, the model or the training report.
SCORING_FREE_SHARES = (0.0, 0.4, 0.8)
RETRAINING_FREE_SHARES = (0.0, 0.8, 0.97)
RETRAIN_PARAMETERS = {"epochs": 2, "seed": 3}
BATCHES = {"morning": 4_000, "noon": 7_000, "night": 4_000}


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A small tmpfs mounted for the test, or a skip saying why there cannot be one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("the full-disk tests mount a small tmpfs, and this machine has no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"the full-disk tests mount a small tmpfs, which is not allowed here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _bytes_used(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _bytes_at_peak(root: Path, run: Callable[[], object]) -> int:
    """Run ``run`` and return the most bytes it added under ``root`` at any moment (temporaries included)."""
    before = _bytes_used(root)
    peak, done = before, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, _bytes_used(root))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
    return max(peak, _bytes_used(root)) - before


def _fill_leaving(disk: Path, free_bytes: int) -> Path:
    """Take all of ``disk``'s space but ``free_bytes`` with one file, and return that file."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(stats.f_bavail * stats.f_frsize - free_bytes, 1))
    return filler


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob(f".*{TEMP_MARKER}*")) + sorted(str(p) for p in root.rglob("*.partial"))


def _night(root: Path) -> None:
    folder = Workspace.at(root).incoming_for(RUN_DATE)
    for i, (name, rows) in enumerate(BATCHES.items()):
        write_rows(make_rows(rows, 300 + i, anomaly_share=0.02, start_id=i * 10_000), folder / f"{name}.parquet")


def _published(root: Path) -> dict[str, bool]:
    """Each batch: whether it has a record; a batch with a record must have both its outputs, whole."""
    ws = Workspace.at(root)
    published = {}
    for batch in BATCHES:
        record = ws.state_dir / "scored" / f"date={RUN_DATE}" / f"{batch}.json"
        outputs = [ws.output_partition(kind, RUN_DATE) / f"{batch}.parquet" for kind in ("scores", "flagged")]
        published[batch] = record.exists()
        if record.exists():
            for path in outputs:
                assert pq.read_metadata(path).num_rows >= 0, f"{path}: a published batch's output is unreadable"
        else:
            assert not any(p.exists() for p in outputs), f"{batch}: outputs published without their record"
    return published


@pytest.fixture(scope="module")
def clean_scoring(harness, trained_workspace, tmp_path_factory) -> tuple[Path, Path, int]:
    """A night before scoring, the same night scored by a run that never failed, and the most that run held."""
    from flows.score import score_flow

    night, clean = tmp_path_factory.mktemp("night") / "ws", tmp_path_factory.mktemp("clean") / "ws"
    shutil.copytree(trained_workspace, night)
    _night(night)
    shutil.copytree(night, clean)
    written = _bytes_at_peak(clean, lambda: score_flow(workspace=str(clean), run_date=RUN_DATE, rows_per_unit=10_000))
    return night, clean, written


@pytest.mark.parametrize("free_share", SCORING_FREE_SHARES)
def test_scoring_on_a_full_disk_fails_naming_the_path_and_a_rerun_equals_a_clean_run(
    clean_scoring, small_disk, free_share
):
    from flows.score import score_flow

    night, clean, written = clean_scoring
    root = small_disk / "ws"
    shutil.copytree(night, root)
    current = (Workspace.at(root).models_dir / "current.json").read_bytes()
    filler = _fill_leaving(small_disk, int(written * free_share))

    state = score_flow(workspace=str(root), run_date=RUN_DATE, rows_per_unit=10_000, return_state=True)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "No space left on device" in message
    assert str(root) in message, f"the error does not name the path that could not be written: {message}"
    assert not _temporaries(root), "the failed run left temporaries behind"
    assert (Workspace.at(root).models_dir / "current.json").read_bytes() == current
    # Late failures (the run report) leave every batch published, whole; early ones leave batches to the rerun.
    published = _published(root)

    filler.unlink()
    again = score_flow(workspace=str(root), run_date=RUN_DATE, rows_per_unit=10_000)
    assert again["batches_scored"] == sum(not p for p in published.values())
    assert again["batches_scored"] + again["batches_skipped"] == len(BATCHES)
    assert all(_published(root).values())
    for kind in ("scores", "flagged"):
        assert _tables(root, kind).equals(_tables(clean, kind)), f"{kind} differ from a run that never failed"
    for batch in BATCHES:
        assert _record(Workspace.at(root), batch) == _record(Workspace.at(clean), batch)
    report = Workspace.at(root).outputs_dir / "reports" / f"date={RUN_DATE}" / "run-report.json"
    assert json.loads(report.read_text())["rows_scored"] == sum(BATCHES.values())
    assert not _temporaries(root)


def _versions(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir())


def _threshold(root: Path) -> float:
    ws = Workspace.at(root)
    version = json.loads((ws.models_dir / "current.json").read_text())["model_version"]
    return json.loads((ws.version_dir(version) / "bundle.json").read_text())["threshold"]["value"]


@pytest.fixture(scope="module")
def clean_retraining(harness, trained_workspace, tmp_path_factory) -> tuple[Path, int]:
    """A workspace retrained by a run that never failed, and the most that run held on disk."""
    from flows.retrain import retrain_flow

    clean = tmp_path_factory.mktemp("clean-retraining") / "ws"
    shutil.copytree(trained_workspace, clean, ignore=shutil.ignore_patterns("incoming", "outputs"))
    return clean, _bytes_at_peak(clean, lambda: retrain_flow(workspace=str(clean), **RETRAIN_PARAMETERS))


@pytest.mark.parametrize("free_share", RETRAINING_FREE_SHARES)
def test_retraining_on_a_full_disk_fails_naming_the_path_and_leaves_the_current_model(
    trained_workspace, clean_retraining, small_disk, free_share
):
    from flows.retrain import retrain_flow

    clean, written = clean_retraining
    root = small_disk / "ws"
    shutil.copytree(trained_workspace, root, ignore=shutil.ignore_patterns("incoming", "outputs"))
    models_dir = Workspace.at(root).models_dir
    current, versions = (models_dir / "current.json").read_bytes(), _versions(models_dir)
    filler = _fill_leaving(small_disk, int(written * free_share))

    state = retrain_flow(workspace=str(root), return_state=True, **RETRAIN_PARAMETERS)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "No space left on device" in message
    assert str(root) in message, f"the error does not name the path that could not be written: {message}"
    assert (models_dir / "current.json").read_bytes() == current
    assert _versions(models_dir) == versions, "a version folder, whole or partial, was left behind"
    assert not _temporaries(root), "the failed run left temporaries behind"

    filler.unlink()
    retrain_flow(workspace=str(root), **RETRAIN_PARAMETERS)
    assert len(_versions(models_dir)) == len(versions) + 1
    assert _threshold(root) == _threshold(clean)
    assert not _temporaries(root)


def test_a_full_disk_is_not_retried_and_an_io_error_is():
    from data.errors import WorkspaceWriteError
    from data.storage import worth_retrying

    for number in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        error = WorkspaceWriteError("/ws/outputs/flagged/x.parquet", OSError(number, os.strerror(number)))
        assert not worth_retrying(error), os.strerror(number)
        assert str(error) == f"/ws/outputs/flagged/x.parquet: could not be written: {os.strerror(number)}"
    assert worth_retrying(WorkspaceWriteError("/ws/state/x.json", OSError(errno.EIO, "Input/output error")))
