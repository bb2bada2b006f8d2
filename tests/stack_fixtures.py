"""A real Prefect stack for the slow end-to-end tests: PostgreSQL, server, process work pool, deployments and worker.

The stack is brought up by ``scripts/stack.sh serve`` (what ``make serve`` runs) on a free loopback
port with a temporary PREFECT_HOME, and ended by ``scripts/stack.sh stop``. Test modules import
``prefect_stack_fixture`` and ask for ``prefect_stack``; the modules of a session share one stack,
stopped after the last of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_SCRIPT = REPO / "scripts" / "stack.sh"
PREFECT_YAML = REPO / "prefect.yaml"
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AlertReceiver:
    """A webhook on loopback that keeps the JSON bodies POSTed to it, as a Slack incoming webhook would receive them."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bodies.append(json.loads(raw))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/anomaly"

    def wait_for(self, matches: Callable[[str], bool], timeout_s: float = 120) -> str:
        """Return the text of the first notification ``matches`` accepts, waiting for it to arrive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for body in list(self.bodies):
                if matches(body.get("text", "")):
                    return body["text"]
            time.sleep(0.5)
        pytest.fail(
            f"no matching notification within {timeout_s:.0f}s; received: "
            f"{[b.get('text', '')[:120] for b in self.bodies]}"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class PrefectStack:
    """Where the stack lives and how to talk to it."""

    home: Path
    port: int
    env: dict[str, str]
    started: list[int] = field(default_factory=list)
    serve_output: str = ""
    alerts: AlertReceiver | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, name: str, lines: int = 80) -> str:
        """Return the end of a log the stack wrote (server, worker, deploy)."""
        path = self.home / "logs" / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else f"({path} does not exist)"
        )

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A synchronous Prefect client talking to this stack's API, as the UI does."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def run_deployment(self, name: str, parameters: dict[str, Any]) -> UUID:
        """Create a flow run of deployment ``flow/deployment`` with ``parameters``, as the UI's Custom run does."""
        with self.client() as client:
            deployment = client.read_deployment_by_name(name)
            return client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id

    def wait_until_final(self, *flow_run_ids: UUID, timeout_s: float = RUN_TIMEOUT_S) -> list[Any]:
        """Wait until every flow run is in a final state (Completed, Failed, Crashed...); return them."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                runs = [client.read_flow_run(i) for i in flow_run_ids]
                if all(r.state is not None and r.state.is_final() for r in runs):
                    return runs
                if time.monotonic() > deadline:
                    states = ", ".join(f"{r.name}: {r.state.name if r.state else None}" for r in runs)
                    pytest.fail(
                        f"flow runs not finished after {timeout_s:.0f}s ({states})\n"
                        f"--- worker log ---\n{self.log('worker')}"
                    )
                time.sleep(1)

    def wait_for(self, *flow_run_ids: UUID, timeout_s: float = RUN_TIMEOUT_S) -> list[Any]:
        """Wait until every flow run is final; fail with the worker's log if one is not Completed."""
        runs = self.wait_until_final(*flow_run_ids, timeout_s=timeout_s)
        failed = [r for r in runs if not r.state.is_completed()]
        if failed:
            details = "; ".join(f"{r.name}: {r.state.name}: {r.state.message}" for r in failed)
            pytest.fail(f"flow runs did not complete: {details}\n--- worker log ---\n{self.log('worker', 200)}")
        return runs

    def flow_run_ids(self, deployment_name: str) -> set[UUID]:
        """The ids of every flow run of a deployment, scheduled ones included."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with self.client() as client:
            deployment = client.read_deployment_by_name(deployment_name)
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
        return {r.id for r in runs}

    def process_tree(self) -> list[int]:
        """The PIDs of the recorded processes and of all their descendants."""
        import psutil

        pids: list[int] = []
        for pid in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                pids += [pid] + [child.pid for child in process.children(recursive=True)]
        return pids

    def stop(self) -> None:
        """Stop the stack as ``make stop`` does; kill and report anything it left behind."""
        import psutil

        tree = self.process_tree()
        result = subprocess.run(
            [str(STACK_SCRIPT), "stop"], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        survivors = []
        for pid in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    survivors.append(pid)
        for pid in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert result.returncode == 0, f"scripts/stack.sh stop failed:\n{result.stdout}\n{result.stderr}"
        assert not survivors, f"scripts/stack.sh stop left processes running (now killed): {survivors}"


def stack_home(prefix: str = "anomaly-stack-") -> Path:
    """Return a new folder for a stack's files that the postgres system user can reach when the stack runs as root.

    pytest's own temporary folders sit under a private (0700) folder of the user's, where PostgreSQL,
    which never runs as root, could not keep its cluster.
    """
    import tempfile

    home = Path(tempfile.mkdtemp(prefix=prefix))
    home.chmod(0o755)
    return home


def start_stack(home: Path, alert_webhook_url: str | None = None, database_url: str | None = None) -> PrefectStack:
    """Run ``scripts/stack.sh serve`` on a free port with ``home`` as PREFECT_HOME; return the running stack.

    The server's database is the stack's own PostgreSQL cluster in ``home``, or ``database_url``.
    """
    # The user's own Prefect settings (a profile, an API URL, a key, a database) must not leak into the test stack.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "ANOMALY_PREFECT_DATABASE_URL"}
    env.update(
        ANOMALY_STACK_DIR=str(home),
        ANOMALY_PREFECT_PORT=str(free_port()),
        ANOMALY_STACK_STARTUP_TIMEOUT=str(START_TIMEOUT_S),
        ANOMALY_STACK_STOP_GRACE="2",
        # Short polling and slot waits keep the runs, and the concurrency check, quick.
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.pop("ANOMALY_ALERT_WEBHOOK_URL", None)
    if database_url:
        env["ANOMALY_PREFECT_DATABASE_URL"] = database_url
    if alert_webhook_url:
        env["ANOMALY_ALERT_WEBHOOK_URL"] = alert_webhook_url
    stack = PrefectStack(home=home, port=int(env["ANOMALY_PREFECT_PORT"]), env=env)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [str(STACK_SCRIPT), "serve"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 120,
        )
    finally:
        stack.started = [
            int(p.read_text()) for p in (home / "postgres.pid", home / "server.pid", home / "worker.pid") if p.exists()
        ]
    if result.returncode != 0:
        server_log = stack.log("server")
        stack.stop()
        pytest.fail(
            f"scripts/stack.sh serve failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
            f"--- server log ---\n{server_log}"
        )
    print(f"\nPrefect stack up in {time.monotonic() - started:.0f}s at {stack.ui_url} (home {home})\n{result.stdout}")
    stack.serve_output = result.stdout
    return stack


@dataclass
class _Shared:
    stack: PrefectStack
    users: int = 0


_SHARED = pytest.StashKey[_Shared]()


@pytest.fixture(scope="session", name="prefect_stack")
def prefect_stack_fixture(request: pytest.FixtureRequest) -> Iterator[PrefectStack]:
    """The running stack; started on first use and stopped when the last module using it is done."""
    # Each importing module registers its own copy of this fixture; the stash makes them share one stack.
    shared = request.config.stash.get(_SHARED, None)
    if shared is None:
        # Every notification the stack's automations send lands here.
        receiver = AlertReceiver()
        try:
            stack = start_stack(stack_home(), receiver.url)
        except BaseException:
            receiver.close()
            raise
        stack.alerts = receiver
        shared = _Shared(stack)
        request.config.stash[_SHARED] = shared
    shared.users += 1
    try:
        yield shared.stack
    finally:
        shared.users -= 1
        if shared.users == 0:
            del request.config.stash[_SHARED]
            try:
                shared.stack.stop()
            finally:
                if shared.stack.alerts is not None:
                    shared.stack.alerts.close()
                shutil.rmtree(shared.stack.home, ignore_errors=True)


def as_utc(value: dt.datetime) -> dt.datetime:
    """Return ``value`` as an aware UTC datetime (server times may come back as other aware types)."""
    return dt.datetime.fromtimestamp(value.timestamp(), tz=dt.UTC)
