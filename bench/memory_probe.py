"""Score one file in this fresh process and print its peak resident memory as JSON (used by bench.run)."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path

from data.workspace import Workspace
from models.bundle import current_version, load_bundle
from models.scoring import batch_outputs, score_batch_file


def main(workspace: str, source: str) -> None:
    """Score ``source`` with the workspace's current model; print rows, seconds and peak RSS."""
    ws = Workspace.at(workspace)
    bundle = load_bundle(ws.version_dir(current_version(ws.models_dir)))
    baseline = peak_rss_mb()
    started = time.perf_counter()
    result = score_batch_file(bundle, Path(source), Path(source).stem, batch_outputs(ws, dt.date(2000, 1, 1), Path(source).stem, True), dt.datetime.now(dt.UTC))
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": result.rows_scored, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_scoring_mb": baseline}))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    VmHWM rather than ru_maxrss: Linux carries ru_maxrss over from the parent's image across
    fork and exec, so a large parent would set a floor under every child's figure.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; the memory probe needs Linux")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
