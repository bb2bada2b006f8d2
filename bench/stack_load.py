"""Load on the local production stack: deployment runs created at once while readers and writers use the API.

What a team does with `make serve`: a worker, someone with the UI open, a backfill creating runs.
Each database the stack can run on (its own PostgreSQL cluster, and Prefect's default SQLite file
beside it for comparison) gets the same load in turn:

- ``runs`` flow runs of the nightly-scoring deployment created at the same moment through the API;
- ``readers`` clients listing flow runs and deployments, and ``writers`` creating and deleting
  variables, for ``seconds``;

then every answer's status is counted and every run waited for until it is final.

``python -m bench.stack_load`` runs it on its own; ``python -m bench.run`` runs it as the section ``stack``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq

from data.demo import make_tutorial_data, rows_table
from tests.stack_fixtures import stack_home, start_stack

SCORING = "score-batches/nightly-scoring"
RETRAINING = "retrain-autoencoder/weekly-retraining"
NIGHT = dt.date(2026, 11, 27)
RUNS_TIMEOUT_S = 1800


def write_workspace(root: Path) -> None:
    """Write 6,000 labelled training rows and one night of 1,000 rows in two files."""
    features, labels = make_tutorial_data(n_samples=7000, random_state=5)
    ids = np.arange(len(labels))
    (root / "training").mkdir(parents=True)
    pq.write_table(rows_table(features[:6000], labels[:6000], ids[:6000]), root / "training" / "training.parquet")
    night = root / "incoming" / NIGHT.isoformat()
    night.mkdir(parents=True)
    for i, part in enumerate(np.array_split(ids[6000:], 2)):
        pq.write_table(rows_table(features[part], labels[part], part), night / f"part-{i}.parquet")


class Load:
    """Clients hitting the API until stopped; every answer's status code is counted."""

    def __init__(self, api_url: str):
        self.api_url = api_url
        self.stop = threading.Event()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def count(self, what: str, response: httpx.Response | None, error: Exception | None = None) -> None:
        with self._lock:
            key = f"{response.status_code}" if response is not None else type(error).__name__
            self.statuses[key] += 1
            if response is None or response.status_code >= 500:
                self.errors.append(f"{what}: {key} {response.text[:200] if response is not None else error}")

    def call(self, client: httpx.Client, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            response = client.request(method, f"{self.api_url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            self.count(what, None, exc)
            return None
        self.count(what, response)
        return response

    def reader(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                self.call(
                    client, "list flow runs", "POST", "/flow_runs/filter", json={"limit": 50, "sort": "START_TIME_DESC"}
                )
                self.call(client, "list deployments", "POST", "/deployments/filter", json={"limit": 50})
                self.call(client, "count flow runs", "POST", "/flow_runs/count", json={})

    def writer(self, number: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                name = f"load-{number}-{n}"
                self.call(client, "create variable", "POST", "/variables/", json={"name": name, "value": n})
                self.call(client, "delete variable", "DELETE", f"/variables/name/{name}")
                n += 1

    def start(self, readers: int, writers: int) -> None:
        self.threads = [threading.Thread(target=self.reader, daemon=True) for _ in range(readers)]
        self.threads += [threading.Thread(target=self.writer, args=(i,), daemon=True) for i in range(writers)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def create_runs_at_once(load: Load, deployment_id: str, parameters: dict[str, Any], runs: int) -> list[str]:
    """Create ``runs`` flow runs of a deployment from as many threads released together; return the ids created."""
    created: list[str] = []
    barrier = threading.Barrier(runs)

    def create() -> None:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            response = load.call(
                client,
                "create flow run",
                "POST",
                f"/deployments/{deployment_id}/create_flow_run",
                json={"parameters": parameters},
            )
            if response is not None and response.status_code == 201:
                created.append(response.json()["id"])

    threads = [threading.Thread(target=create) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return created


def final_states(api_url: str, run_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Wait until every flow run is final (or the timeout passes); return each run's state name."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=60) as client:
        while True:
            states = {}
            for run_id in run_ids:
                state = client.get(f"{api_url}/flow_runs/{run_id}").json().get("state") or {}
                states[run_id] = (state.get("type"), state.get("name"))
            if (
                all(kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for kind, _ in states.values())
                or time.monotonic() > deadline
            ):
                return {run_id: name for run_id, (_, name) in states.items()}
            time.sleep(2)


def run_load(database: str, seconds: float, runs: int, readers: int, writers: int, log) -> dict[str, Any]:
    """Bring a stack up on ``database`` ("postgresql" or "sqlite"), load it, and report every answer and run."""
    home = stack_home(f"anomaly-load-{database}-")
    database_url = f"sqlite+aiosqlite:///{home / 'prefect.db'}" if database == "sqlite" else None
    stack = start_stack(home, database_url=database_url)
    try:
        workspace = home / "workspace"
        write_workspace(workspace)
        with stack.client() as client:
            retraining = client.read_deployment_by_name(RETRAINING)
            scoring = client.read_deployment_by_name(SCORING)
            retrain_id = client.create_flow_run_from_deployment(
                retraining.id, parameters={"workspace": str(workspace), "epochs": 5}
            ).id
        stack.wait_for(retrain_id)
        log(
            f"stack on {database}: model trained; {runs} runs at once, {readers} readers and {writers} writers for "
            f"{seconds:.0f} s"
        )
        load = Load(stack.api_url)
        load.start(readers, writers)
        started = time.monotonic()
        created = create_runs_at_once(
            load, str(scoring.id), {"workspace": str(workspace), "run_date": NIGHT.isoformat(), "force": True}, runs
        )
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        load.finish()
        requests = sum(load.statuses.values())
        states = final_states(stack.api_url, created, RUNS_TIMEOUT_S)
        all_final = time.monotonic() - started
        server_errors = sum(n for code, n in load.statuses.items() if code.isdigit() and int(code) >= 500)
        result = {
            "database": database,
            "seconds_of_load": seconds,
            "readers": readers,
            "writers": writers,
            "requests": requests,
            "requests_per_s": requests / seconds,
            "status_counts": dict(load.statuses),
            "server_errors": server_errors,
            "failed_requests": len(load.errors),
            "first_errors": load.errors[:5],
            "runs_requested": runs,
            "runs_created": len(created),
            "run_states": dict(collections.Counter(states.values())),
            "runs_completed": sum(name == "Completed" for name in states.values()),
            "seconds_until_runs_final": all_final,
        }
        log(
            f"stack on {database}: {requests:,} requests ({result['requests_per_s']:.0f}/s), "
            f"{server_errors} answered 5xx; "
            f"{len(created)} of {runs} runs created, {result['runs_completed']} completed {result['run_states']}"
        )
        return result
    finally:
        stack.stop()
        shutil.rmtree(home, ignore_errors=True)


def stack_load(
    seconds: float, runs: int, readers: int, writers: int, log, databases: tuple[str, ...] = ("postgresql", "sqlite")
) -> dict[str, Any]:
    """The same load on each database, in turn."""
    return {database: run_load(database, seconds, runs, readers, writers, log) for database in databases}


def main(argv: list[str] | None = None) -> int:
    """Run the load and print one JSON line; exit 1 when a request got a 5xx or a run did not complete on PostgreSQL."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], action="append", help="default: both")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    results = stack_load(
        args.seconds, args.runs, args.readers, args.writers, log, tuple(args.database or ("postgresql", "sqlite"))
    )
    print(json.dumps(results, default=str))
    postgres = results.get("postgresql")
    return 0 if postgres is None or (postgres["server_errors"] == 0 and postgres["runs_completed"] == args.runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
