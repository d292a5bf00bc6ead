#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on loopback for the distributed-search tests.
# Usage: scripts/pg_test_server.sh start|stop [DIR] ; prints the storage URL on start.
# Installs Debian's postgresql when missing (CI machines start bare).
set -euo pipefail
action="${1:-start}"
dir="${2:-/tmp/bnas-pg}"
port="${BNAS_PG_PORT:-55432}"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] && [ "$action" = start ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
run_as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
case "$action" in
  start)
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres "$dir"
      run_as_pg "$bin/initdb -D '$dir' -U bnas --auth=trust -E UTF8 >/dev/null"
    fi
    run_as_pg "$bin/pg_ctl -D '$dir' -l '$dir/server.log' -w -o \"-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200\" start >/dev/null"
    run_as_pg "$bin/createdb -h 127.0.0.1 -p $port -U bnas bnas_test 2>/dev/null || true"
    echo "postgresql://bnas@127.0.0.1:$port/bnas_test"
    ;;
  stop)
    run_as_pg "$bin/pg_ctl -D '$dir' -m fast -w stop >/dev/null" || true
    ;;
  restart)
    run_as_pg "$bin/pg_ctl -D '$dir' -m fast -w -o \"-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200\" restart >/dev/null"
    ;;
  *) echo "usage: $0 start|stop|restart [DIR]" >&2; exit 2 ;;
esac
