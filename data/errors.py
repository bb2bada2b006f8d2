"""Exception types that name the file, column or parameter at fault."""

from __future__ import annotations

import os


class AnomalyJobError(Exception):
    """Base class for every error this product raises on bad input or state."""


class ParameterError(AnomalyJobError, ValueError):
    """A parameter value is invalid; the message names the parameter."""


class BatchFileError(AnomalyJobError):
    """A Parquet file cannot be used; the message names the file and, where known, the column."""

    def __init__(
        self, path: object, reason: str, column: str | None = None, code: str = "unreadable", transient: bool = False
    ):
        self.path = str(path)
        self.column = column
        self.reason = reason
        self.code = code
        # Transient errors (an I/O error of the disk or network file system) are worth retrying; bad files are not.
        self.transient = transient
        where = f"{self.path}" + (f", column '{column}'" if column else "")
        super().__init__(f"{where}: {reason}")


class SchemaError(BatchFileError):
    """A file's columns do not match the model bundle's features."""


class TrainingDataError(AnomalyJobError):
    """Training data is missing, unlabelled or too small."""


class BundleError(AnomalyJobError):
    """A model bundle is missing, incomplete or has been tampered with."""


class NoBatchesError(AnomalyJobError):
    """There is nothing to score for the requested date or paths."""


class WorkspaceWriteError(AnomalyJobError, OSError):
    """A file of the workspace could not be written (a full disk, a quota, an I/O error); the message names it.

    It keeps the cause's errno, so the retry rule for transient errors applies to it as to the cause.
    """

    code = "write_failed"

    def __init__(self, path: object, cause: OSError):
        self.path = str(path)
        reason = os.strerror(cause.errno) if cause.errno else str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"{self.path}: could not be written: {reason}")

    def __str__(self) -> str:
        return self.strerror
