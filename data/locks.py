"""The workspace's named locks, so two runs never write the same outputs at once."""

from __future__ import annotations

import contextlib
import datetime as dt

from data import storage
from data.storage import DEFAULT_LOCK_TIMEOUT_S, LockBusyError, LockTimeoutError
from data.workspace import Workspace

__all__ = ["DEFAULT_LOCK_TIMEOUT_S", "LockBusyError", "LockTimeoutError", "retraining_lock", "scoring_lock"]


def scoring_lock(workspace: Workspace, run_date: dt.date, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[None]:
    """Lock one date's outputs: a second scoring run of the date waits, then skips what the first scored."""
    return storage.lock(workspace.state_dir / "locks" / f"score-{run_date.isoformat()}.lock", timeout_s)


def retraining_lock(workspace: Workspace, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[None]:
    """Lock the models folder while a retraining run builds, publishes and promotes a version, or a version is promoted by hand."""
    return storage.lock(workspace.state_dir / "locks" / "retrain.lock", timeout_s)
