#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for tests: starts
# the machine's cluster if it is stopped, installs Debian's if there is none.
# Prints a connection string for a role that may create databases.
#
#   ops/postgres.sh ensure
set -euo pipefail
host="${TROOP_PG_HOST:-127.0.0.1}"
port="${TROOP_PG_PORT:-5432}"

ready() { pg_isready -q -h "$host" -p "$port" 2>/dev/null; }

case "${1:-}" in
    ensure)
        if ! command -v pg_isready >/dev/null || ! ls /etc/postgresql/* >/dev/null 2>&1; then
            [ "$(id -u)" -eq 0 ] || { echo "missing: postgresql (Debian: apt-get install postgresql)" >&2; exit 1; }
            apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        fi
        if ! ready; then
            version="$(ls /etc/postgresql | sort -V | tail -1)"
            pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
            for _ in $(seq 1 100); do ready && break; sleep 0.1; done
        fi
        ready || { echo "PostgreSQL does not answer on $host:$port" >&2; exit 1; }
        # Trust auth for local TCP on the test machine kind; a fresh Debian
        # install asks for a password there, so the tests use the postgres
        # role over its socket when TCP refuses.
        if psql -h "$host" -p "$port" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
            echo "host=$host port=$port user=postgres dbname=postgres"
        else
            su postgres -c "psql -Atqc \"alter role postgres password 'troop-test'\"" >/dev/null
            echo "host=$host port=$port user=postgres password=troop-test dbname=postgres"
        fi
        ;;
    *)
        echo "usage: $0 ensure" >&2
        exit 2
        ;;
esac
