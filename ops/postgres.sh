#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for tests: starts
# the machine's cluster if it is stopped, installs Debian's if there is none.
# Prints a connection string for a role that may create databases.
#
#   ops/postgres.sh ensure
#
# A private server of its own, for a test that stops and starts it (the
# shared one must stay up for the others): `private DIR PORT` creates one in
# DIR (empty or missing) if needed and starts it on 127.0.0.1:PORT, printing
# its connection string; `stop DIR` stops it at once, as a crash would
# (`-m immediate`: the next start recovers from its write-ahead log). As
# root, the server runs as `postgres`, who must be able to reach DIR.
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
    private)
        dir="${2:?usage: $0 private DIR PORT}"
        port="${3:?usage: $0 private DIR PORT}"
        "$0" ensure >/dev/null
        bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
        [ -n "$bin" ] || bin="$(dirname "$(command -v initdb)")"
        # The server refuses to run as root: as root, it runs as `postgres`.
        as=()
        if [ "$(id -u)" -eq 0 ]; then as=(runuser -u postgres --); fi
        mkdir -p "$dir"
        if [ "$(id -u)" -eq 0 ]; then
            chown postgres "$dir"
            runuser -u postgres -- test -x "$dir" ||
                { echo "the postgres user cannot reach $dir (make its parents a+x)" >&2; exit 1; }
        fi
        chmod 0700 "$dir"
        if [ ! -f "$dir/PG_VERSION" ]; then
            "${as[@]}" "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >&2
        fi
        "${as[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >&2
        echo "host=127.0.0.1 port=$port user=postgres dbname=postgres"
        ;;
    stop)
        dir="${2:?usage: $0 stop DIR}"
        bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
        [ -n "$bin" ] || bin="$(dirname "$(command -v pg_ctl)")"
        as=()
        if [ "$(id -u)" -eq 0 ]; then as=(runuser -u postgres --); fi
        "${as[@]}" "$bin/pg_ctl" -D "$dir" -m immediate -w stop >&2
        ;;
    *)
        echo "usage: $0 ensure | private DIR PORT | stop DIR" >&2
        exit 2
        ;;
esac
