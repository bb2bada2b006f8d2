"""Every workspace file operation in one place: read, list, fingerprint, write-then-publish and remove.

Locks are in data.locks.

A location is a local path or an object-storage URI (``s3://bucket/prefix``, ``gs://…``, any fsspec
protocol): :func:`as_path` turns it into a ``pathlib.Path`` or a ``upath.UPath``, and every function
here takes either.

On a local disk files are written under a temporary name beside their target and renamed into place
when complete, so readers never see half a file. Temporaries are created the way ``open()`` creates
a file, so the process's umask decides their permissions (0644 under umask 022) and other users can
read what is published. Object stores have no rename: a file is written to a local spool file, then
uploaded once to its final key, and an upload (single or multipart) becomes visible only when it
completes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fnmatch
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from upath import UPath

from data.errors import AnomalyJobError, WorkspaceWriteError

TEMP_MARKER = ".tmp"
SPOOL_STALE_S = 24 * 3600.0
_HASH_BLOCK = 1 << 20
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
UPLOAD_CONCURRENCY = 2

log = logging.getLogger(__name__)

Location = str | os.PathLike[str] | UPath


# Locations


def as_path(location: Location) -> Path:
    """Return a local path (also for ``file://`` URIs) as a ``Path``, an object-storage URI as a ``UPath``."""
    if isinstance(location, UPath):
        return location if is_remote(location) else Path(location.path)
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    protocol = text.split("://", 1)[0]
    if protocol in _LOCAL_PROTOCOLS:
        return Path(UPath(text).path)
    # Listings are not cached: other processes (Dask workers, a second run) write the same prefixes.
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol in _S3_PROTOCOLS:
        # s3fs uploads up to 10 parts of 50 MB at once; two keep an upload's memory as small for a
        # file of gigabytes as for one of a hundred megabytes.
        options["max_concurrency"] = UPLOAD_CONCURRENCY
    return UPath(text, **options)


def check_reachable(path: Path, parameter: str) -> Path:
    """Refuse an object-storage URI whose bucket does not exist or cannot be reached, naming it.

    The check uses the configured credentials.
    """
    if is_remote(path):
        _check_bucket(path.protocol, path.path.split("/", 1)[0], str(path), parameter)
    return path


@functools.lru_cache(maxsize=64)
def _check_bucket(protocol: str, bucket: str, location: str, parameter: str) -> None:
    # Cached only when the bucket answers: one request per bucket and process.
    fs = as_path(f"{protocol}://{bucket}").fs
    settings = "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for an S3-compatible store"
    try:
        found = fs.exists(bucket)
    except PermissionError:
        return  # a policy may grant the workspace's prefix but not the bucket itself; the first read or write tells
    except OSError as exc:
        raise AnomalyJobError(
            f"{parameter}={location!r}: bucket {bucket!r} could not be reached ({exc}); "
            f"check the endpoint and the network ({settings})"
        ) from exc
    if not found:
        raise AnomalyJobError(
            f"{parameter}={location!r}: bucket {bucket!r} does not exist, or these credentials cannot see it; "
            f"create it first ({settings})"
        )


def absolute(location: Location) -> Path:
    """Return a local path made absolute (``~`` expanded, links resolved), or an object-storage URI as it is."""
    path = as_path(location)
    return path if is_remote(path) else path.expanduser().resolve()


def is_remote(path: Location) -> bool:
    """Return True for a location in object storage (any fsspec protocol but the local one)."""
    return isinstance(path, UPath) and not isinstance(path, Path)


def spool_dir() -> Path:
    """Return the local folder where files bound for object storage are written before their upload (under TMPDIR)."""
    return make_dir(Path(tempfile.gettempdir()) / "anomaly-spool")


def local_work_dir(location: Location) -> Path:
    """Return a local folder to build or spill ``location``'s content in.

    That is the location itself on a disk, a spool folder for a URI.
    """
    path = as_path(location)
    if not is_remote(path):
        return path
    return spool_dir() / hashlib.sha256(str(path.parent).encode()).hexdigest()[:16] / path.name


def arrow_source(location: Location) -> tuple[str, Any]:
    """Return ``(path, filesystem)`` for pyarrow's readers: the fsspec filesystem of a URI, None on a local disk."""
    path = as_path(location)
    return (path.path, path.fs) if is_remote(path) else (str(path), None)


def register_with_duckdb(connection: Any, locations: list[Location]) -> list[str]:
    """Let a DuckDB connection read ``locations`` (object storage through fsspec) and return them as DuckDB paths."""
    paths = [as_path(p) for p in locations]
    for fs in {id(p.fs): p.fs for p in paths if is_remote(p)}.values():
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & set(connection.list_filesystems()):
            connection.register_filesystem(fs)
    return [str(p) for p in paths]


def open_binary(location: Location) -> IO[bytes]:
    """Open a file for reading bytes, on a disk or in object storage."""
    path = as_path(location)
    return path.fs.open(path.path, "rb") if is_remote(path) else open(path, "rb")


# Reading and listing


def read_text(path: Location) -> str:
    """Return a file's text (UTF-8)."""
    return as_path(path).read_text(encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Return a JSON file's content."""
    return json.loads(read_text(path))


def read_json_if_present(path: str | os.PathLike[str]) -> Any | None:
    """Return a JSON file's content, or None when it is missing or not valid JSON (a damaged record)."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_file(path: Location) -> bool:
    """Return True if ``path`` is an existing file."""
    return as_path(path).is_file()


def is_dir(path: Location) -> bool:
    """Return True if ``path`` is an existing folder (in object storage: a prefix holding objects)."""
    return as_path(path).is_dir()


def list_files(folder: Location, pattern: str = "*", recursive: bool = False) -> list[Path]:
    """Return the visible files in ``folder`` matching ``pattern``, sorted; temporaries and dot-files are left out."""
    root = as_path(folder)
    if is_remote(root):
        return _list_remote_files(root, pattern, recursive)
    if not root.is_dir():
        return []
    found = root.rglob(pattern) if recursive else root.glob(pattern)
    return sorted(
        p for p in found if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _list_remote_files(root: UPath, pattern: str, recursive: bool) -> list[UPath]:
    # One listing call for the whole prefix, instead of a request per file to tell files from folders.
    prefix = root.path.rstrip("/") + "/"
    try:
        entries = root.fs.find(root.path, maxdepth=None if recursive else 1, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for key, info in entries.items():
        parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
        if (
            info.get("type") == "file"
            and parts
            and not any(part.startswith(".") for part in parts)
            and fnmatch.fnmatch(parts[-1], pattern)
        ):
            found.append(root.joinpath(*parts))
    return sorted(found, key=str)


def list_dirs(folder: Location) -> list[Path]:
    """Return the visible sub-folders of ``folder``, sorted."""
    root = as_path(folder)
    if is_remote(root):
        try:
            entries = root.fs.ls(root.path, detail=True)
        except FileNotFoundError:
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
        return sorted((root / name for name in names if not name.startswith(".")), key=str)
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
    """What changes whenever a file's bytes do: its identity, size, and modification and status-change times.

    On a disk the identity is the inode, and the status-change time cannot be set back by a user; in
    object storage it is the object's ETag (and version), which every upload changes. So an
    unchanged state means unchanged bytes without reading them again.
    """

    identity: str
    size: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: Location) -> FileState:
    """Return a file's current state, without reading its bytes."""
    path = as_path(path)
    if is_remote(path):
        info = path.fs.info(path.path)
        mtime_ns = _modified_ns(info)
        return FileState(f"{info.get('ETag', '')}{info.get('VersionId') or ''}", int(info["size"]), mtime_ns, mtime_ns)
    stat = os.stat(path)
    return FileState(str(stat.st_ino), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _modified_ns(info: dict[str, Any]) -> int:
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(modified, str):
        modified = dt.datetime.fromisoformat(modified.replace("Z", "+00:00"))
    if isinstance(modified, dt.datetime):
        return int(modified.timestamp() * 1_000_000) * 1000
    return int(float(modified or 0) * 1e9)


def size_and_mtime(path: Location) -> tuple[int, int]:
    """Return a file's size in bytes and modification time in nanoseconds."""
    state = file_state(path)
    return state.size, state.mtime_ns


def content_hash(path: Location) -> str:
    """Return the SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open_binary(path) as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Location) -> Fingerprint:
    """Return the size, modification time and SHA-256 of a file."""
    size, mtime_ns = size_and_mtime(path)
    return Fingerprint(size=size, mtime_ns=mtime_ns, sha256=content_hash(path))


def files_digest(paths: list[Path]) -> str:
    """Return one SHA-256 over the names and bytes of ``paths``, identifying exactly this data."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open_binary(path) as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


# A full disk, a quota or a read-only mount does not clear up in a few seconds: the run fails, and is run
# again once there is room.
PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EFBIG,
    }
)


def is_transient(error: BaseException) -> bool:
    """Return True for an OS error worth retrying (I/O, network file systems), not a missing or forbidden file.

    Parquet readers also raise OSError for corrupt data, but without an errno: those are not transient.
    """
    return isinstance(error, OSError) and error.errno is not None and error.errno not in PERMANENT_ERRNOS


# How often, and how far apart, a read or write that failed with a transient error is tried again.
TRANSIENT_RETRIES = 2
TRANSIENT_RETRY_DELAY_S = 2


def worth_retrying(error: BaseException) -> bool:
    """Return True for an error a retry may cure: one marked transient, or a transient OS error."""
    return bool(getattr(error, "transient", False)) or is_transient(error)


# Writing: a temporary beside the target (renamed into place) or in the spool (uploaded once) when complete


@contextlib.contextmanager
def naming_write_errors(target: Location, temporary: Path | None = None) -> Iterator[None]:
    """Turn an OS error of writing ``target`` (or its ``temporary``) into a WorkspaceWriteError that names ``target``.

    Writers such as pyarrow's report a full disk without the file's name. An error that names another
    file (a source being copied) or is already one of this product's is let through as it is.
    """
    try:
        yield
    except OSError as exc:
        own = {str(target), str(temporary)}
        if isinstance(exc, AnomalyJobError) or (exc.filename is not None and str(exc.filename) not in own):
            raise
        raise WorkspaceWriteError(target, exc) from exc


class StagedFile:
    """A file being written under a temporary name; ``publish`` puts it in place, ``discard`` removes it.

    For an object-storage target the temporary is a local spool file and ``publish`` uploads it to
    the final key: the object appears whole or not at all.
    """

    def __init__(self, target: Location, suffix: str = ""):
        self.target = as_path(target)
        folder = spool_dir() if is_remote(self.target) else make_dir(self.target.parent)
        while True:
            self.tmp = folder / f".{self.target.name}.{secrets.token_hex(6)}{TEMP_MARKER}{suffix}"
            try:
                # Created like open() creates files (mode 0666 less the umask), unlike mkstemp's 0600.
                os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise WorkspaceWriteError(self.target, exc) from exc

    def publish(self) -> Path:
        """Flush the temporary to disk and rename it over the target, or upload it to the target's key."""
        with naming_write_errors(self.target, self.tmp):
            if is_remote(self.target):
                self.target.fs.put_file(str(self.tmp), self.target.path)
                self.tmp.unlink(missing_ok=True)
                return self.target
            _fsync_file(self.tmp)
            os.replace(self.tmp, self.target)
            _fsync_dir(self.target.parent)
            return self.target

    def discard(self) -> None:
        """Remove the temporary; the target is left as it was."""
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_path(target: Location, suffix: str = "") -> Iterator[Path]:
    """Yield a local temporary path for ``target``; on success it replaces ``target``, on error it is removed."""
    staged = StagedFile(target, suffix)
    try:
        with naming_write_errors(staged.target, staged.tmp):
            yield staged.tmp
        staged.publish()
    finally:
        staged.discard()


def write_text(target: Location, text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with staged_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return as_path(target)


def write_json(target: Location, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``target`` atomically and return the path."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def make_dir(path: Location) -> Path:
    """Create a folder and its parents (permissions from the umask) and return it; object storage needs none."""
    folder = as_path(path)
    if not is_remote(folder):
        with naming_write_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
    return folder


def fresh_dir(path: Location) -> Path:
    """Return ``path`` as a new empty folder, removing whatever was there."""
    remove_tree(path)
    return make_dir(path)


def download(location: Location, target: Path) -> Path:
    """Copy a file (from object storage or a disk) to the local path ``target`` atomically."""
    path = as_path(location)
    with staged_path(target) as tmp:
        if is_remote(path):
            path.fs.get_file(path.path, str(tmp))
        else:
            shutil.copyfile(path, tmp)
    return target


def publish_dir(staging: Location, target: Location, last: str | None = None) -> Path:
    """Put a fully written local ``staging`` folder at ``target``, replacing an older one.

    On a disk the folder is renamed. In object storage its files are uploaded one by one, the file
    named ``last`` (the folder's record) after all the others, and the staging folder is removed.
    """
    staging, target = as_path(staging), as_path(target)
    with naming_write_errors(target, staging):
        return _publish_dir(staging, target, last)


def _publish_dir(staging: Path, target: Path, last: str | None) -> Path:
    if is_remote(target):
        remove_tree(target)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
        for path in files:
            target.fs.put_file(str(path), target.joinpath(*path.relative_to(staging).parts).path)
        shutil.rmtree(staging, ignore_errors=True)
        return target
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


def remove(path: Location | None) -> bool:
    """Remove a file if it exists; return True if there was one."""
    if path is None:
        return False
    path = as_path(path)
    if is_remote(path):
        if not path.fs.exists(path.path):
            return False
        path.fs.rm_file(path.path)
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: Location) -> None:
    """Remove a folder and everything in it, if it exists."""
    path = as_path(path)
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            if path.fs.exists(path.path):
                path.fs.rm(path.path, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(folder: Location) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder``; call only while holding that folder's lock.

    Object storage holds no temporaries: an upload a killed run left unfinished never becomes an
    object. Spool files of killed runs are removed once a day old (younger ones may be another
    run's upload in progress).
    """
    root = as_path(folder)
    if is_remote(root):
        cutoff = time.time() - SPOOL_STALE_S
        stale = [p for p in spool_dir().glob(f".*{TEMP_MARKER}*") if p.is_file() and p.stat().st_mtime < cutoff]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale
    if not root.is_dir():
        return []
    stale = [p for p in root.glob(f".*{TEMP_MARKER}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


