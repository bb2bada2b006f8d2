#!/usr/bin/env bash
# The local production stack: a Prefect server on loopback, the process work pool, the
# deployments of prefect.yaml and a process worker, each started in the background.
#
#   scripts/stack.sh serve    start what is not running yet, register the deployments, print the UI address
#   scripts/stack.sh stop     end exactly the processes `serve` started (their PIDs are recorded)
#   scripts/stack.sh status   what runs, whether the API answers, which deployments it holds
#
# Settings (environment):
#   ANOMALY_PREFECT_PORT  port of the local server (default 4200); it listens on 127.0.0.1 only
#   ANOMALY_STACK_DIR     folder of the server's database, the PID files and the logs (default .prefect-home)
#   ANOMALY_ALERT_WEBHOOK_URL  where the alerting automations send notifications (Slack-compatible JSON);
#                         without it the automations exist but send nothing
#   PREFECT_API_URL       when set (to another address than the local server's), no server is started:
#                         the work pool, the deployments and the worker use that server
#   VENV                  the virtual environment holding prefect (default .venv)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
VENV=${VENV:-.venv}
BIN=$(cd "$VENV/bin" 2>/dev/null && pwd -P) || {
    echo "error: no virtual environment at $VENV: run 'make install' first" >&2
    exit 1
}
PREFECT=$BIN/prefect
PYTHON=$BIN/python
HOST=127.0.0.1
PORT=${ANOMALY_PREFECT_PORT:-4200}
STARTUP_TIMEOUT=${ANOMALY_STACK_STARTUP_TIMEOUT:-120}
STOP_GRACE=${ANOMALY_STACK_STOP_GRACE:-5}
mkdir -p "${ANOMALY_STACK_DIR:-$ROOT/.prefect-home}"
STACK_DIR=$(cd "${ANOMALY_STACK_DIR:-$ROOT/.prefect-home}" && pwd -P)
LOG_DIR=$STACK_DIR/logs

# The pool name and the deployments have one home, prefect.yaml: read them rather than repeat them.
read -r POOL N_DEPLOYMENTS < <("$PYTHON" -c '
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as handle:
    deployments = yaml.safe_load(handle)["deployments"]
pools = {d["work_pool"]["name"] for d in deployments}
if len(pools) != 1:
    sys.exit(f"prefect.yaml: expected one work pool for every deployment, found {sorted(pools)}")
print(pools.pop(), len(deployments))
' "$ROOT/prefect.yaml") || true
[[ -n "${POOL:-}" ]] || {
    echo "error: could not read the work pool from $ROOT/prefect.yaml" >&2
    exit 1
}

# Whether the PID recorded in $1.pid is alive and still a prefect process.
is_running() {
    local pid_file=$STACK_DIR/$1.pid pid
    [[ -f "$pid_file" ]] || return 1
    pid=$(cat "$pid_file")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # PIDs are reused (after a reboot, say): only a prefect command line counts.
    [[ $(ps -o args= -p "$pid" 2>/dev/null) == *prefect* ]]
}

# A running local server keeps the port it was started on.
if is_running server && [[ -f "$STACK_DIR/port" ]]; then
    PORT=$(cat "$STACK_DIR/port")
fi
LOCAL_API_URL=http://$HOST:$PORT/api
if [[ -n "${PREFECT_API_URL:-}" && "${PREFECT_API_URL%/}" != "$LOCAL_API_URL" ]]; then
    EXTERNAL_SERVER=1
    API_URL=${PREFECT_API_URL%/}
else
    EXTERNAL_SERVER=0
    API_URL=$LOCAL_API_URL
    # Everything this Prefect keeps (database, profiles, UI assets) stays in the project folder.
    export PREFECT_HOME=$STACK_DIR
fi
export PREFECT_API_URL=$API_URL
export PREFECT_SERVER_ANALYTICS_ENABLED=false
UI_URL=${API_URL%/api}

# Start "$@" detached, in a session and process group of its own; record its PID in $1.pid.
start_detached() {
    local name=$1
    shift
    mkdir -p "$LOG_DIR"
    : >"$LOG_DIR/$name.log"
    if command -v setsid >/dev/null; then
        setsid "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
    else
        (
            set -m
            exec "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1
        ) &
    fi
    echo $! >"$STACK_DIR/$name.pid"
}

# Every descendant of PID $1, deepest first.
descendants() {
    local child
    for child in $(ps -A -o pid=,ppid= | awk -v parent="$1" '$2 == parent { print $1 }'); do
        descendants "$child"
        echo "$child"
    done
}

stop_one() {
    local name=$1 pid pids
    if ! is_running "$name"; then
        if [[ -f "$STACK_DIR/$name.pid" ]]; then
            echo "$name: not running (stale PID file removed)"
            rm -f "$STACK_DIR/$name.pid"
        fi
        return 0
    fi
    pid=$(cat "$STACK_DIR/$name.pid")
    # Flow runs get process groups of their own, so the tree is collected before anything ends.
    pids="$(descendants "$pid" | tr '\n' ' ')$pid"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    # The server ends on SIGTERM; the worker only stops taking new runs and waits for the ones in
    # progress, so whatever is left after the grace period is killed.
    for _ in $(seq 1 $((STOP_GRACE * 4))); do
        # shellcheck disable=SC2086
        kill -0 $pids 2>/dev/null || break
        sleep 0.25
    done
    # shellcheck disable=SC2086
    if kill -0 $pids 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || true
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    rm -f "$STACK_DIR/$name.pid"
    echo "$name: stopped (PID $pid)"
}

api_healthy() {
    "$PYTHON" -c '
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1] + "/health", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
' "$API_URL"
}

port_in_use() {
    "$PYTHON" -c '
import socket
import sys

with socket.socket() as s:
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
' "$HOST" "$PORT"
}

wait_for_api() {
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until api_healthy; do
        if [[ $EXTERNAL_SERVER == 0 ]] && ! is_running server; then
            echo "error: the Prefect server exited during start-up; the end of $LOG_DIR/server.log:" >&2
            tail -n 30 "$LOG_DIR/server.log" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "error: no answer from $API_URL/health after ${STARTUP_TIMEOUT}s (see $LOG_DIR/server.log)" >&2
            exit 1
        fi
        sleep 1
    done
}

serve() {
    mkdir -p "$LOG_DIR"
    if [[ $EXTERNAL_SERVER == 1 ]]; then
        echo "server: using PREFECT_API_URL=$API_URL (no local server started)"
    elif is_running server; then
        echo "server: already running (PID $(cat "$STACK_DIR/server.pid")) at $UI_URL"
    else
        if port_in_use; then
            echo "error: $HOST:$PORT is taken by another program; choose a free port with ANOMALY_PREFECT_PORT=<port>" >&2
            exit 1
        fi
        echo "server: starting on $HOST:$PORT (database and logs in $STACK_DIR)"
        echo "$PORT" >"$STACK_DIR/port"
        start_detached server env PREFECT_SERVER_API_HOST="$HOST" PREFECT_SERVER_API_PORT="$PORT" \
            "$PREFECT" server start --host "$HOST" --port "$PORT"
    fi
    wait_for_api

    if "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
        echo "work pool: $POOL exists"
    else
        echo "work pool: creating $POOL (process)"
        if ! "$PREFECT" work-pool create "$POOL" --type process >"$LOG_DIR/work-pool.log" 2>&1; then
            cat "$LOG_DIR/work-pool.log" >&2
            exit 1
        fi
    fi

    echo "deployments: prefect --no-prompt deploy --all (output in $LOG_DIR/deploy.log)"
    # Wide lines keep each of prefect's messages on one line of the log.
    if ! COLUMNS=240 "$PREFECT" --no-prompt deploy --all >"$LOG_DIR/deploy.log" 2>&1; then
        echo "error: the deploy failed; its output:" >&2
        cat "$LOG_DIR/deploy.log" >&2
        exit 1
    fi
    # prefect deploy skips a prefect.yaml it cannot validate and still exits 0: count what it registered.
    local created
    created=$(grep -c "successfully created" "$LOG_DIR/deploy.log" || true)
    if [[ "$created" != "$N_DEPLOYMENTS" ]]; then
        echo "error: $created of $N_DEPLOYMENTS deployments registered; the deploy output:" >&2
        cat "$LOG_DIR/deploy.log" >&2
        exit 1
    fi
    grep -o "Deployment '[^']*'" "$LOG_DIR/deploy.log" | sed 's/^/  /'

    # The alerting automations of flows/automations.py, created or updated by name.
    echo "automations: anomaly alerts (output in $LOG_DIR/alerts.log)"
    if ! "$BIN/anomaly" alerts >"$LOG_DIR/alerts.log" 2>&1; then
        echo "error: the automations could not be applied; the output:" >&2
        cat "$LOG_DIR/alerts.log" >&2
        exit 1
    fi
    "$PYTHON" -c '
import json
import sys

outcome = json.loads(sys.stdin.read().strip().splitlines()[-1])
for automation in outcome["automations"]:
    print("  %s: %s" % (automation["action"], automation["name"]))
if outcome.get("notifications"):
    print("  notifications: %s (ANOMALY_ALERT_WEBHOOK_URL)" % outcome["notifications"])
else:
    print("  notifications: NONE will be sent; set ANOMALY_ALERT_WEBHOOK_URL and run make serve again")
' <"$LOG_DIR/alerts.log"

    if is_running worker; then
        echo "worker: already running (PID $(cat "$STACK_DIR/worker.pid"))"
    else
        echo "worker: starting on pool $POOL (log in $LOG_DIR/worker.log)"
        start_detached worker "$PREFECT" worker start --pool "$POOL" --type process --name "anomaly-worker-${HOSTNAME:-local}"
        sleep 3
        if ! is_running worker; then
            echo "error: the worker exited at once; the end of $LOG_DIR/worker.log:" >&2
            tail -n 30 "$LOG_DIR/worker.log" >&2
            exit 1
        fi
    fi

    echo
    if [[ $EXTERNAL_SERVER == 1 ]]; then
        echo "Prefect API:  $API_URL (its UI lists the deployments)"
    else
        echo "Prefect UI:   $UI_URL  (deployments: $UI_URL/deployments)"
        echo "In a shell:   export PREFECT_API_URL=$API_URL"
    fi
    echo "Stop it with: make stop"
}

stop() {
    stop_one worker
    stop_one server
    rm -f "$STACK_DIR/port"
}

status() {
    local name code=0
    for name in server worker; do
        if [[ $name == server && $EXTERNAL_SERVER == 1 ]]; then
            echo "server: not started here; PREFECT_API_URL=$API_URL"
        elif is_running "$name"; then
            echo "$name: running (PID $(cat "$STACK_DIR/$name.pid"), log $LOG_DIR/$name.log)"
        else
            echo "$name: not running"
            code=1
        fi
    done
    if api_healthy; then
        echo "API: $API_URL answers"
        COLUMNS=120 "$PREFECT" deployment ls 2>/dev/null || true
    else
        echo "API: no answer from $API_URL"
        code=1
    fi
    return $code
}

case "${1:-}" in
    serve) serve ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 serve|stop|status" >&2
        exit 2
        ;;
esac
