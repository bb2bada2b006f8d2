"""The workspace's named locks, so two runs never write the same outputs at once.

On a disk a lock is an OS file lock, released if the process dies; in a bucket it is a lease with
an expiry, renewed while held and taken over once expired.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from filelock import FileLock, Timeout
from upath import UPath

from data.errors import AnomalyJobError
from data.storage import Location, as_path, is_remote
from data.workspace import Workspace

DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0
LEASE_ENV = "ANOMALY_LOCK_LEASE_S"
DEFAULT_LEASE_S = 120.0

log = logging.getLogger(__name__)


class LockTimeoutError(AnomalyJobError):
    """Another run held the lock for longer than this run was willing to wait."""


class LockBusyError(LockTimeoutError):
    """The lock is held by another run and this run asked not to wait."""


@contextlib.contextmanager
def lock(path: Location, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the lock ``path`` for the block: an OS-level file lock on a disk, a lease in object storage.

    The file lock is released if the process dies.

    ``timeout_s=0`` does not wait: :class:`LockBusyError` says another run holds it.
    """
    path = as_path(path)
    if is_remote(path):
        with Lease(path, timeout_s):
            yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(path)
    try:
        held.acquire(timeout=timeout_s)
    except Timeout:
        if timeout_s <= 0:
            raise LockBusyError(f"{path}: held by another run") from None
        raise LockTimeoutError(
            f"{path}: another run has held this lock for over {timeout_s:g} s; "
            "is a run stuck? Its process holds the file open"
        ) from None
    try:
        yield
    finally:
        held.release()


def lease_seconds() -> float:
    """Return how long a lease in object storage lasts without renewal (ANOMALY_LOCK_LEASE_S, default 120 s)."""
    value = os.environ.get(LEASE_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_LEASE_S
    except ValueError:
        raise AnomalyJobError(f"{LEASE_ENV}={value!r} is not a number of seconds") from None
    if seconds < 1:
        raise AnomalyJobError(f"{LEASE_ENV}={value!r}: a lease must last at least 1 s")
    return seconds


class Lease:
    """A lock in object storage: an object created only if absent, renewed while held, taken over once expired.

    The holder rewrites the object every third of the lease; a run that dies stops renewing, and
    another run takes the lock over once the lease has expired. On S3 the takeover and each renewal
    are conditional on the object's ETag, so two runs never both hold it.
    """

    def __init__(self, path: UPath, timeout_s: float):
        self.path, self.fs, self.key = path, path.fs, path.path
        self.timeout_s, self.lease_s = timeout_s, lease_seconds()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.lease_s)
        return json.dumps({"owner": self.owner, "expires_at": expires.isoformat()}).encode()

    def _conditional_put(self, if_match: str) -> str:
        bucket, key, _ = self.fs.split_path(self.key)
        return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=if_match)["ETag"]

    def _try_acquire(self) -> bool:
        try:
            self.fs.pipe_file(self.key, self._body(), mode="create")
        except FileExistsError:
            return self._take_over_if_expired()
        self.etag = self.fs.info(self.key).get("ETag")
        return True

    def _take_over_if_expired(self) -> bool:
        held: Any = {}
        try:
            info = self.fs.info(self.key)
            held = json.loads(self.fs.cat_file(self.key))
            expired = dt.datetime.fromisoformat(held["expires_at"]) < dt.datetime.now(dt.UTC)
        except FileNotFoundError:
            return False  # released meanwhile: the next attempt creates it
        except (ValueError, KeyError, TypeError):
            expired = True  # a damaged lease object protects nothing
        if not expired:
            return False
        log.warning(
            "%s: taking over the lease of %s, expired",
            self.path,
            held.get("owner", "an unknown run") if isinstance(held, dict) else "an unknown run",
        )
        if hasattr(self.fs, "call_s3") and info.get("ETag"):
            try:
                self.etag = self._conditional_put(info["ETag"])
            except OSError:
                return False  # another run took it over first
            return True
        self.fs.rm_file(self.key)
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if hasattr(self.fs, "call_s3") and self.etag:
                    self.etag = self._conditional_put(self.etag)
                else:
                    self.fs.pipe_file(self.key, self._body())
            except OSError as exc:
                log.error("%s: could not renew the lease (%s); another run may take the lock over", self.path, exc)

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.timeout_s
        while not self._try_acquire():
            if self.timeout_s <= 0:
                raise LockBusyError(f"{self.path}: held by another run")
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"{self.path}: another run has held this lease for over {self.timeout_s:g} s; "
                    f"is a run stuck? A dead run's lease expires {self.lease_s:g} s after its last renewal"
                )
            time.sleep(min(1.0, self.lease_s / 10))
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            if json.loads(self.fs.cat_file(self.key)).get("owner") == self.owner:
                self.fs.rm_file(self.key)


def scoring_lock(
    workspace: Workspace, run_date: dt.date, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> contextlib.AbstractContextManager[None]:
    """Lock one date's outputs: a second scoring run of the date waits, then skips what the first scored."""
    return lock(workspace.state_dir / "locks" / f"score-{run_date.isoformat()}.lock", timeout_s)


def retraining_lock(
    workspace: Workspace, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> contextlib.AbstractContextManager[None]:
    """Lock the models folder while a retraining run builds, publishes and promotes a version.

    Promoting a version by hand takes it too.
    """
    return lock(workspace.state_dir / "locks" / "retrain.lock", timeout_s)
