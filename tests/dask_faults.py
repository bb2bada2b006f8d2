"""Dask worker preload for the fault tests: lets a test make units kill their worker process or fail.

A test asks for a fault by creating a file in the folder named by DASK_FAULTS_DIR:

- ``exit`` or ``oserror``: the first unit to remove the file kills its process or raises OSError, so
  the request strikes exactly once;
- ``merge-oserror``: the first merge of units to remove the file raises OSError half-way, once;
- ``merge-exit``: the first merge to remove the file kills its process once it has published the
  outputs, before its result leaves the worker, so Dask runs that merge again;
- ``poison-<batch>``: every unit of that batch kills its process, as a file that exhausts memory would.
"""

from __future__ import annotations

import errno
import os

import models.scoring.units

FAULTS_DIR = os.environ.get("DASK_FAULTS_DIR", "")


def _claim(fault: str) -> bool:
    try:
        os.unlink(os.path.join(FAULTS_DIR, fault))
    except FileNotFoundError:
        return False
    return True


# Dask may run a preload more than once in a process; wrap the real function only once.
if FAULTS_DIR and not hasattr(models.scoring.units.score_unit, "unfaulted"):
    unfaulted = models.scoring.units.score_unit

    def score_unit_with_faults(workspace_root, run_date, batch, *args, **kwargs):
        if _claim("exit") or os.path.exists(os.path.join(FAULTS_DIR, f"poison-{batch.name}")):
            os._exit(17)  # the worker process dies mid-unit, as on a lost machine
        if _claim("oserror"):
            raise OSError(errno.EIO, "disk went away for a moment")
        return unfaulted(workspace_root, run_date, batch, *args, **kwargs)

    score_unit_with_faults.unfaulted = unfaulted
    models.scoring.units.score_unit = score_unit_with_faults


if FAULTS_DIR and not hasattr(models.scoring.units.concatenate_parquet, "unfaulted"):
    unfaulted_concatenate = models.scoring.units.concatenate_parquet

    def concatenate_with_faults(parts, target):
        if _claim("merge-oserror"):
            raise OSError(errno.EIO, "disk went away in the middle of a merge")
        return unfaulted_concatenate(parts, target)

    concatenate_with_faults.unfaulted = unfaulted_concatenate
    models.scoring.units.concatenate_parquet = concatenate_with_faults


if FAULTS_DIR and not hasattr(models.scoring.units.merge_units, "unfaulted"):
    unfaulted_merge = models.scoring.units.merge_units

    def merge_with_faults(*args, **kwargs):
        result = unfaulted_merge(*args, **kwargs)
        if _claim("merge-exit"):
            os._exit(17)  # the worker holding a finished merge's result dies, as on a lost machine
        return result

    merge_with_faults.unfaulted = unfaulted_merge
    models.scoring.units.merge_units = merge_with_faults
