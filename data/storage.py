"""Every workspace file operation in one place: read, list, write-then-publish, remove and lock.

Files are written under a temporary name beside their target and renamed into place when complete,
so readers never see half a file. Temporaries are created the way ``open()`` creates a file, so the
process's umask decides their permissions (0644 under umask 022) and other users can read what is
published. A second backend (object storage) is a change to this module only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from data.errors import AnomalyJobError

TEMP_MARKER = ".tmp"
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0
_HASH_BLOCK = 1 << 20


class LockTimeoutError(AnomalyJobError):
    """Another run held the lock for longer than this run was willing to wait."""


class LockBusyError(LockTimeoutError):
    """The lock is held by another run and this run asked not to wait."""


# Reading and listing


def read_text(path: str | os.PathLike[str]) -> str:
    """Return a file's text (UTF-8)."""
    return Path(path).read_text(encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Return a JSON file's content."""
    return json.loads(read_text(path))


def read_json_if_present(path: str | os.PathLike[str]) -> Any | None:
    """Return a JSON file's content, or None when it is missing or not valid JSON (a damaged record)."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_file(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` is an existing file."""
    return Path(path).is_file()


def is_dir(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` is an existing folder."""
    return Path(path).is_dir()


def list_files(folder: str | os.PathLike[str], pattern: str = "*", recursive: bool = False) -> list[Path]:
    """Return the visible files in ``folder`` matching ``pattern``, sorted; temporaries and dot-files are left out."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = root.rglob(pattern) if recursive else root.glob(pattern)
    return sorted(p for p in found if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def list_dirs(folder: str | os.PathLike[str]) -> list[Path]:
    """Return the visible sub-folders of ``folder``, sorted."""
    root = Path(folder)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a file's bytes: size, modification time and SHA-256."""

    size: int
    mtime_ns: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """Return the fingerprint as manifest fields."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "content_sha256": self.sha256}


@dataclass(frozen=True)
class FileState:
    """What changes whenever a file's bytes do: its inode, size, and modification and status-change times.

    The status-change time cannot be set back by a user, so an unchanged state means unchanged bytes
    without reading them again.
    """

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: str | os.PathLike[str]) -> FileState:
    """Return a file's current state, without reading its bytes."""
    stat = os.stat(path)
    return FileState(stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def size_and_mtime(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return a file's size in bytes and modification time in nanoseconds."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def content_hash(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """Return the size, modification time and SHA-256 of a file."""
    stat = os.stat(path)
    return Fingerprint(size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=content_hash(path))


def files_digest(paths: list[Path]) -> str:
    """Return one SHA-256 over the names and bytes of ``paths``, identifying exactly this data."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


def is_transient(error: BaseException) -> bool:
    """Return True for an operating-system error worth retrying (I/O, network file systems), not a missing or forbidden file.

    Parquet readers also raise OSError for corrupt data, but without an errno: those are not transient.
    """
    return isinstance(error, OSError) and error.errno is not None and error.errno not in PERMANENT_ERRNOS


# Writing: a temporary beside the target, renamed into place when complete


class StagedFile:
    """A file being written under a temporary name; ``publish`` renames it into place, ``discard`` removes it."""

    def __init__(self, target: str | os.PathLike[str], suffix: str = ""):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.tmp = self.target.with_name(f".{self.target.name}.{secrets.token_hex(6)}{TEMP_MARKER}{suffix}")
            try:
                # Created like open() creates files (mode 0666 less the umask), unlike mkstemp's 0600.
                os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                continue

    def publish(self) -> Path:
        """Flush the temporary to disk and rename it over the target."""
        _fsync_file(self.tmp)
        os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        """Remove the temporary; the target is left as it was."""
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is removed."""
    staged = StagedFile(target, suffix)
    try:
        yield staged.tmp
        staged.publish()
    finally:
        staged.discard()


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with staged_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``target`` atomically and return the path."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def make_dir(path: str | os.PathLike[str]) -> Path:
    """Create a folder and its parents (permissions from the umask) and return it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fresh_dir(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a new empty folder, removing whatever was there."""
    remove_tree(path)
    return make_dir(path)


def publish_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename a fully written ``staging`` folder to ``target``, replacing an older one."""
    staging, target = Path(staging), Path(target)
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)
    return target


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Removing


def remove(path: str | os.PathLike[str] | None) -> bool:
    """Remove a file if it exists; return True if there was one."""
    if path is None:
        return False
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a folder and everything in it, if it exists."""
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder``; call only while holding that folder's lock."""
    root = Path(folder)
    if not root.is_dir():
        return []
    stale = [p for p in root.glob(f".*{TEMP_MARKER}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# Locking


@contextlib.contextmanager
def lock(path: str | os.PathLike[str], timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the lock file ``path`` (an OS-level lock, released if the process dies) for the block.

    ``timeout_s=0`` does not wait: :class:`LockBusyError` says another run holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(path)
    try:
        held.acquire(timeout=timeout_s)
    except Timeout:
        if timeout_s <= 0:
            raise LockBusyError(f"{path}: held by another run") from None
        raise LockTimeoutError(f"{path}: another run has held this lock for over {timeout_s:g} s; is a run stuck? Its process holds the file open") from None
    try:
        yield
    finally:
        held.release()
