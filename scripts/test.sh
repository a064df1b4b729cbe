#!/usr/bin/env bash
# Installs dependencies, builds everything and runs every test (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)"

# One throwaway PostgreSQL server on loopback for the store tests. install-deps.sh installed it, so
# a server that will not start is a broken machine, not a reason to skip them quietly:
# PERFUSION_ALLOW_NO_PG=1 runs the rest anyway (the PostgreSQL tests then skip).
PG_DIR=$(mktemp -d)
cleanup() {
  scripts/pg-test-server.sh stop "$PG_DIR" >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
trap cleanup EXIT
# A random port may be taken: three tries, each in a fresh folder. Why it failed is shown, not hidden.
url=""
for attempt in 1 2 3; do
  rm -rf "$PG_DIR" && mkdir -p "$PG_DIR"
  if url=$(scripts/pg-test-server.sh start "$PG_DIR" 2>"$PG_DIR.log"); then break; fi
  url=""
done
if [[ -n "$url" ]]; then
  export PERFUSION_TEST_PG_URL="$url"
  echo "test: PostgreSQL test server at $url"
else
  echo "test: the PostgreSQL test server did not start (3 tries). Last attempt said:"
  tail -5 "$PG_DIR.log" 2>/dev/null || true
  if [[ "${PERFUSION_ALLOW_NO_PG:-0}" != 1 ]]; then
    echo "test: failing; set PERFUSION_ALLOW_NO_PG=1 to run the other tests without PostgreSQL" >&2
    exit 1
  fi
fi
rm -f "$PG_DIR.log"

ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900
