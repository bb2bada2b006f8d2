"""Run the scoring flow on a night (or evaluation, or retraining) and print its peak resident memory as JSON.

It runs in a fresh process of its own (used by bench.run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time


def main(argv: list[str] | None = None) -> None:
    """Score ``--run-date`` of ``workspace`` with the flow (forced); print rows, seconds and this process's peak RSS."""
    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("--run-date", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--dask-workers", type=int, default=0)
    parser.add_argument(
        "--evaluate-days",
        type=int,
        default=0,
        help="evaluate this many scored dates ending at --run-date instead of scoring it",
    )
    parser.add_argument(
        "--retrain-max-rows",
        type=int,
        default=0,
        help="retrain (one epoch, not promoted) with this max_training_rows instead of scoring",
    )
    args = parser.parse_args(argv)
    if args.retrain_max_rows:
        from flows.retrain import retrain_flow

        started = time.perf_counter()
        outcome = retrain_flow(
            workspace=args.workspace, max_training_rows=args.retrain_max_rows, epochs=1, promote=False
        )
        print(
            json.dumps(
                {
                    "rows_read": outcome["training_rows_read"],
                    "rows_sampled": outcome["training_rows_sampled"],
                    "seconds": time.perf_counter() - started,
                    "peak_rss_mb": peak_rss_mb(),
                }
            )
        )
        return
    if args.evaluate_days:
        from flows.evaluate import evaluate_flow

        baseline = peak_rss_mb()
        started = time.perf_counter()
        outcome = evaluate_flow(workspace=args.workspace, end_date=args.run_date, window_days=args.evaluate_days)
        seconds = time.perf_counter() - started
        rows = sum(r["rows_scored"] for r in outcome["evaluations"])
        print(
            json.dumps(
                {
                    "rows": rows,
                    "label_rows": outcome["label_rows"],
                    "seconds": seconds,
                    "peak_rss_mb": peak_rss_mb(),
                    "rss_before_evaluating_mb": baseline,
                }
            )
        )
        return

    from flows.score import score_flow

    baseline = peak_rss_mb()
    started = time.perf_counter()
    outcome = score_flow(
        workspace=args.workspace, run_date=args.run_date, force=True, dask_workers=args.dask_workers, catch_up_days=0
    )
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "rows": outcome["rows_scored"],
                "roc_auc": outcome.get("roc_auc"),
                "seconds": seconds,
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_scoring_mb": baseline,
            }
        )
    )


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
    main()
