#!/usr/bin/env bash
# Installs dependencies, builds everything and runs every test (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)"

# One throwaway PostgreSQL server on loopback for the store tests (they skip if it cannot start).
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
  echo "test: no PostgreSQL test server; the PostgreSQL store tests will skip. Last attempt said:"
  tail -5 "$PG_DIR.log" 2>/dev/null || true
fi
rm -f "$PG_DIR.log"

ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900
