"""Dask worker preload for the fault tests: lets a test make the next unit a worker scores kill its process or fail once.

A test asks for a fault by creating a file named after it (``exit`` or ``oserror``) in the folder named by
DASK_FAULTS_DIR; the first unit to remove the file takes the fault, so each request strikes exactly once.
"""

from __future__ import annotations

import os

import models.scoring

FAULTS_DIR = os.environ.get("DASK_FAULTS_DIR", "")


def _claim(fault: str) -> bool:
    try:
        os.unlink(os.path.join(FAULTS_DIR, fault))
    except FileNotFoundError:
        return False
    return True


# Dask may run a preload more than once in a process; wrap the real function only once.
if FAULTS_DIR and not hasattr(models.scoring.score_unit, "unfaulted"):
    unfaulted = models.scoring.score_unit

    def score_unit_with_faults(*args, **kwargs):
        if _claim("exit"):
            os._exit(17)  # the worker process dies mid-unit, as on a lost machine
        if _claim("oserror"):
            raise OSError("disk went away for a moment")
        return unfaulted(*args, **kwargs)

    score_unit_with_faults.unfaulted = unfaulted
    models.scoring.score_unit = score_unit_with_faults
