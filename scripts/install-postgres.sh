#!/usr/bin/env bash
# Install Debian's PostgreSQL server (initdb, pg_ctl, postgres) for the local stack's database, if it is missing.
# Prints the folder holding those programs (and psql).
set -euo pipefail

# The newest server installed: ANOMALY_POSTGRES_BIN, then PATH, then Debian's versioned folders.
find_bin_dir() {
    if [[ -n "${ANOMALY_POSTGRES_BIN:-}" ]]; then
        if [[ -x "$ANOMALY_POSTGRES_BIN/initdb" ]]; then echo "$ANOMALY_POSTGRES_BIN"; fi
        return 0
    fi
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        # Debian links the programs into PATH; the folder they come from also holds psql and createdb.
        dirname "$(readlink -f "$(command -v initdb)")"
        return
    fi
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && echo "$dir" && return
    done
    return 0
}

dir=$(find_bin_dir)
if [[ -z "$dir" ]]; then
    if [[ -n "${ANOMALY_POSTGRES_BIN:-}" ]]; then
        echo "error: ANOMALY_POSTGRES_BIN=$ANOMALY_POSTGRES_BIN holds no initdb" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null; then
        echo "error: PostgreSQL's server programs (initdb, pg_ctl) are missing and this is not a Debian-like system:" \
            "install PostgreSQL and put its bin folder on PATH (or in ANOMALY_POSTGRES_BIN)," \
            "or point the stack at an existing database with ANOMALY_PREFECT_DATABASE_URL" >&2
        exit 1
    fi
    SUDO=()
    if [[ $(id -u) != 0 ]]; then
        SUDO=(sudo)
    fi
    echo "Installing postgresql with apt-get (the local Prefect server's database)" >&2
    "${SUDO[@]}" apt-get update -qq >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    dir=$(find_bin_dir)
    if [[ -z "$dir" ]]; then
        echo "error: apt-get installed postgresql but no initdb was found under /usr/lib/postgresql" >&2
        exit 1
    fi
fi
echo "$dir"
