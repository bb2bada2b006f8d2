"""Running ``anomaly`` commands as a user does: each a new process with its own embedded Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any


def run_anomaly(*args: str) -> dict[str, Any]:
    """Run one ``anomaly`` command in a new process with a Prefect home of its own; return its JSON line."""
    env = {
        **os.environ,
        "PREFECT_HOME": tempfile.mkdtemp(prefix="bench-anomaly-"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"anomaly {' '.join(args)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
