"""Cross-process locks in the workspace, so two runs never write the same outputs at once."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator

from filelock import FileLock, Timeout

from data.errors import AnomalyJobError
from data.workspace import Workspace

DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0


class LockTimeoutError(AnomalyJobError):
    """Another run held the lock for longer than this run was willing to wait."""


@contextlib.contextmanager
def workspace_lock(workspace: Workspace, name: str, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``state/locks/<name>.lock`` (an OS-level lock, released if the process dies) for the block."""
    path = workspace.state_dir / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise LockTimeoutError(f"{path}: another run has held this lock for over {timeout_s:g} s; is a run stuck? Its process holds the file open") from None
    try:
        yield
    finally:
        lock.release()


def scoring_lock(workspace: Workspace, run_date: dt.date, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[None]:
    """Lock one date's outputs: a second scoring run of the date waits, then skips what the first scored."""
    return workspace_lock(workspace, f"score-{run_date.isoformat()}", timeout_s)


def retraining_lock(workspace: Workspace, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[None]:
    """Lock the models folder while a retraining run builds, publishes and promotes a version."""
    return workspace_lock(workspace, "retrain", timeout_s)
