"""Score one file in this fresh process and print its peak resident memory as JSON (used by bench.run)."""

from __future__ import annotations

import datetime as dt
import json
import resource
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
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = score_batch_file(bundle, Path(source), Path(source).stem, batch_outputs(ws, dt.date(2000, 1, 1), Path(source).stem, True), dt.datetime.now(dt.UTC))
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": result.rows_scored, "seconds": seconds, "peak_rss_mb": peak_kib / 1024, "rss_before_scoring_mb": baseline / 1024}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
