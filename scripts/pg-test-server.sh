#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and benchmarks: a fresh cluster in a temp folder,
# listening on 127.0.0.1 only, trust auth, fsync off (tests, never data you keep).
#
#   scripts/pg-test-server.sh start DIR [PORT]   # prints the connection URL on stdout
#   scripts/pg-test-server.sh stop DIR           # stops it (fast shutdown); DIR is left to rm
#
# Binaries: $PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's postgresql package),
# else initdb/pg_ctl on PATH. PostgreSQL refuses to run as root: when run as root the cluster
# is created and run as the `postgres` system user (runuser). Exit 3: PostgreSQL not installed.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start DIR [PORT] | stop DIR" >&2
  exit 2
fi

bin=${PG_BIN:-}
if [[ -z "$bin" ]]; then
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/initdb" ]]; then bin=$d; break; fi
  done
fi
if [[ -z "$bin" ]] && command -v initdb >/dev/null 2>&1; then bin=$(dirname "$(command -v initdb)"); fi
if [[ -z "$bin" || ! -x "$bin/initdb" || ! -x "$bin/pg_ctl" ]]; then
  echo "pg-test-server: PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 3
fi

as_owner=()
if [[ $(id -u) -eq 0 ]]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "pg-test-server: running as root needs the 'postgres' system user" >&2
    exit 3
  fi
  as_owner=(runuser -u postgres --)
fi

case "$cmd" in
  start)
    port=${3:-$((20000 + RANDOM % 20000))}
    mkdir -p "$dir"
    if [[ ${#as_owner[@]} -gt 0 ]]; then chown postgres "$dir"; fi
    "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U perfusion -A trust -E UTF8 --no-sync \
      --no-instructions >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # On a failed start (a port taken, a 30 s timeout while it still comes up) stop whatever started:
    # the caller registers its stop only on success.
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
      start >/dev/null || {
        cat "$dir/server.log" >&2
        "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
        exit 1
      }
    echo "postgres://perfusion@127.0.0.1:$port/postgres"
    ;;
  stop)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
      "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    fi
    ;;
  *)
    echo "usage: $0 start DIR [PORT] | stop DIR" >&2
    exit 2
    ;;
esac
