"""The workspace: one root folder (on a disk or in object storage) holding every runtime file.

Its layout is the one the README describes.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from data import storage
from data.errors import ParameterError

WORKSPACE_ENV = "ANOMALY_WORKSPACE"
DEFAULT_WORKSPACE = "./workspace"


def default_workspace() -> str:
    """Return the workspace root from ANOMALY_WORKSPACE, or ./workspace."""
    return os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE)


def check_path_part(value: str, parameter: str) -> str:
    """Refuse a name that would step outside its folder (``..``, separators, absolute paths)."""
    if not value or value in {".", ".."} or "/" in value or "\\" in value or value.startswith("~"):
        raise ParameterError(f"{parameter}={value!r} is not a plain name: use letters, digits, '-', '_' or '.'")
    return value


@dataclass(frozen=True)
class Workspace:
    """Paths of every runtime folder under one root."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> Workspace:
        """Return the workspace at ``root``, a folder or a URI such as ``s3://bucket/prefix``.

        ``root`` defaults to ANOMALY_WORKSPACE, or ./workspace.
        """
        return cls(
            storage.check_reachable(storage.absolute(root if root is not None else default_workspace()), "workspace")
        )

    @property
    def training_dir(self) -> Path:
        return self.root / "training"

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def incoming_for(self, run_date: dt.date) -> Path:
        return self.incoming_dir / run_date.isoformat()

    def output_partition(self, kind: str, run_date: dt.date) -> Path:
        """Return ``outputs/<kind>/date=<YYYY-MM-DD>``, the Hive-style partition for one date."""
        return self.outputs_dir / check_path_part(kind, "kind") / f"date={run_date.isoformat()}"

    def version_dir(self, version: str) -> Path:
        return self.models_dir / check_path_part(version, "model_version")


def resolve_run_date(run_date: dt.date | None, timezone: str) -> dt.date:
    """Return ``run_date``, or today in ``timezone`` when it is None; an unknown time zone is refused either way."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ParameterError(
            f"timezone={timezone!r} is not an IANA time zone name such as 'UTC' or 'Europe/Paris'"
        ) from exc
    return run_date if run_date is not None else dt.datetime.now(zone).date()
