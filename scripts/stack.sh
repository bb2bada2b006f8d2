#!/usr/bin/env bash
# The local production stack: a PostgreSQL database, a Prefect server on loopback using it, the
# process work pool, the deployments of prefect.yaml and a process worker, each started in the background.
#
#   scripts/stack.sh serve    start what is not running yet, register the deployments, print the UI address
#   scripts/stack.sh stop     end exactly the processes `serve` started (their PIDs are recorded)
#   scripts/stack.sh status   what runs, whether the API answers, which deployments it holds
#
# Settings (environment):
#   ANOMALY_PREFECT_PORT  port of the local server (default 4200); it listens on 127.0.0.1 only
#   ANOMALY_STACK_DIR     folder of the database cluster, the PID files and the logs (default .prefect-home)
#   ANOMALY_PREFECT_DATABASE_URL  an existing PostgreSQL database for the server, as
#                         postgresql+asyncpg://user:password@host:5432/prefect; without it a private cluster
#                         is created on first use in $ANOMALY_STACK_DIR/postgres (initdb), listening on
#                         127.0.0.1 only with a password of its own, and kept between runs
#   ANOMALY_POSTGRES_PORT port of the private cluster (default: a free port, chosen when it starts)
#   ANOMALY_POSTGRES_BIN  folder of initdb and pg_ctl (default: PATH, then Debian's /usr/lib/postgresql/<version>/bin;
#                         installed with apt-get when missing)
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

# Whether the PID recorded in $1.pid is alive and still the program it was ($2: prefect, or postgres).
is_running() {
    local pid_file=$STACK_DIR/$1.pid pid
    [[ -f "$pid_file" ]] || return 1
    pid=$(cat "$pid_file")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # PIDs are reused (after a reboot, say): only the program's own command line counts.
    [[ $(ps -o args= -p "$pid" 2>/dev/null) == *"${2:-prefect}"* ]]
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

# PostgreSQL: the server's database. A private cluster in $PG_DIR unless ANOMALY_PREFECT_DATABASE_URL names one.
PG_DIR=$STACK_DIR/postgres
PG_DATA=$PG_DIR/data
PG_PASSWORD_FILE=$PG_DIR/password
PG_USER=prefect
PG_DATABASE=prefect
if [[ -n "${ANOMALY_PREFECT_DATABASE_URL:-}" ]]; then
    EXTERNAL_DATABASE=1
else
    EXTERNAL_DATABASE=0
fi

# PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres system user.
run_as_cluster_owner() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u "${ANOMALY_POSTGRES_OS_USER:-postgres}" -- "$@"
    else
        "$@"
    fi
}

# The port the running cluster listens on: the fourth line of its postmaster.pid.
cluster_port() {
    sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null
}

free_port() {
    "$PYTHON" -c '
import socket

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
'
}

# Create the cluster on first use: a password of its own, connections from 127.0.0.1 only.
init_cluster() {
    local owner
    if [[ $(id -u) == 0 ]]; then
        owner=${ANOMALY_POSTGRES_OS_USER:-postgres}
        if ! id "$owner" >/dev/null 2>&1; then
            echo "error: PostgreSQL does not run as root and there is no '$owner' user to run it as;" \
                "create one (Debian's postgresql package does) or set ANOMALY_POSTGRES_OS_USER" >&2
            exit 1
        fi
    fi
    mkdir -p "$PG_DIR"
    chmod 700 "$PG_DIR"
    if [[ ! -s "$PG_PASSWORD_FILE" ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(24))' >"$PG_PASSWORD_FILE")
    fi
    if [[ -n "${owner:-}" ]]; then
        chown "$owner:" "$PG_DIR" "$PG_PASSWORD_FILE"
        if ! run_as_cluster_owner test -w "$PG_DIR"; then
            echo "error: the '$owner' user, which runs PostgreSQL here, cannot reach $PG_DIR (a folder above it is private);" \
                "set ANOMALY_STACK_DIR to a folder it can reach, or ANOMALY_PREFECT_DATABASE_URL to an existing database" >&2
            exit 1
        fi
    fi
    [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
    echo "database: creating a PostgreSQL cluster in $PG_DATA (initdb; log in $LOG_DIR/initdb.log)"
    if ! run_as_cluster_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$PG_PASSWORD_FILE" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >"$LOG_DIR/initdb.log" 2>&1; then
        cat "$LOG_DIR/initdb.log" >&2
        rm -rf "$PG_DATA"
        exit 1
    fi
    # Loopback TCP only, no Unix socket (its path would depend on folders this script does not own);
    # enough connections for the server's pools and a team's clients.
    cat >>"$PG_DATA/postgresql.conf" <<CONF

# Written by scripts/stack.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
CONF
}

start_database() {
    PG_BIN=$("$ROOT/scripts/install-postgres.sh")
    init_cluster
    if is_running postgres postgres; then
        PG_PORT=$(cluster_port)
        echo "database: PostgreSQL already running (PID $(cat "$STACK_DIR/postgres.pid"), port $PG_PORT)"
        return 0
    fi
    PG_PORT=${ANOMALY_POSTGRES_PORT:-$(free_port)}
    echo "database: starting PostgreSQL on 127.0.0.1:$PG_PORT (cluster $PG_DATA)"
    : >"$LOG_DIR/postgres.log"
    if [[ $(id -u) == 0 ]]; then
        chown "${ANOMALY_POSTGRES_OS_USER:-postgres}:" "$LOG_DIR/postgres.log"
    fi
    if ! run_as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$LOG_DIR/postgres.log" -w -t "$STARTUP_TIMEOUT" \
        -o "-p $PG_PORT" start >"$LOG_DIR/pg_ctl.log" 2>&1; then
        echo "error: PostgreSQL did not start; the end of $LOG_DIR/postgres.log:" >&2
        tail -n 30 "$LOG_DIR/postgres.log" >&2
        exit 1
    fi
    head -n 1 "$PG_DATA/postmaster.pid" >"$STACK_DIR/postgres.pid"
    local exists
    exists=$(PGPASSWORD=$(cat "$PG_PASSWORD_FILE") "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")
    if [[ "$exists" != 1 ]]; then
        PGPASSWORD=$(cat "$PG_PASSWORD_FILE") "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DATABASE"
    fi
}

# The server's database URL: the given one, or the private cluster's.
database_url() {
    if [[ $EXTERNAL_DATABASE == 1 ]]; then
        echo "$ANOMALY_PREFECT_DATABASE_URL"
    else
        echo "postgresql+asyncpg://$PG_USER:$(cat "$PG_PASSWORD_FILE")@127.0.0.1:$PG_PORT/$PG_DATABASE"
    fi
}

# A database URL without its password, for messages.
redacted() {
    sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#' <<<"$1"
}

stop_database() {
    if ! is_running postgres postgres; then
        if [[ -f "$STACK_DIR/postgres.pid" ]]; then
            echo "postgres: not running (stale PID file removed)"
            rm -f "$STACK_DIR/postgres.pid"
        fi
        return 0
    fi
    local pid
    pid=$(cat "$STACK_DIR/postgres.pid")
    PG_BIN=$("$ROOT/scripts/install-postgres.sh")
    # Fast shutdown: sessions are ended, every committed transaction is kept.
    if ! run_as_cluster_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >"$LOG_DIR/pg_ctl.log" 2>&1; then
        cat "$LOG_DIR/pg_ctl.log" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STACK_DIR/postgres.pid"
    echo "postgres: stopped (PID $pid)"
}

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
        if [[ $EXTERNAL_DATABASE == 1 ]]; then
            echo "database: $(redacted "$ANOMALY_PREFECT_DATABASE_URL") (ANOMALY_PREFECT_DATABASE_URL; nothing started)"
        else
            start_database
        fi
        echo "server: starting on $HOST:$PORT (logs in $LOG_DIR)"
        echo "$PORT" >"$STACK_DIR/port"
        # The URL holds the database's password: it goes to the server's environment only, never to a log.
        start_detached server env PREFECT_SERVER_API_HOST="$HOST" PREFECT_SERVER_API_PORT="$PORT" \
            PREFECT_SERVER_DATABASE_CONNECTION_URL="$(database_url)" \
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
    stop_database
    rm -f "$STACK_DIR/port"
}

status() {
    local name code=0
    if [[ $EXTERNAL_SERVER == 1 ]]; then
        :
    elif [[ $EXTERNAL_DATABASE == 1 ]]; then
        echo "postgres: not started here; ANOMALY_PREFECT_DATABASE_URL=$(redacted "$ANOMALY_PREFECT_DATABASE_URL")"
    elif is_running postgres postgres; then
        echo "postgres: running (PID $(cat "$STACK_DIR/postgres.pid"), 127.0.0.1:$(cluster_port), cluster $PG_DATA, log $LOG_DIR/postgres.log)"
    else
        echo "postgres: not running$([[ -f "$PG_DATA/PG_VERSION" ]] && echo " (cluster kept in $PG_DATA)")"
        code=1
    fi
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
