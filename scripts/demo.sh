#!/usr/bin/env bash
# The main job on the embedded default: installs dependencies, builds, starts perfusion-server and one
# perfusion-worker on the shipped tiny model (models/tiny), trains two concepts from shapes-world
# renders with perfusionctl (progress bars), then generates images that use both, also placed side by
# side with regional prompts. PNGs go to out/demo/.
#
#   scripts/demo.sh                 # everything
#   STEPS=80 scripts/demo.sh        # fewer training steps (default 150)
#   PORT=50151 METRICS_PORT=9190 WORKER_METRICS_PORT=9191 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" --target perfusion-server perfusion-worker perfusionctl perfusion-render-shapes

SHARED=${PERFUSION_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}
VOCAB_DIR=${PERFUSION_CLIP_VOCAB_DIR:-$SHARED/data/clip}
MODEL=${MODEL:-$ROOT/models/tiny}
OUT=${OUT:-$ROOT/out/demo}
PORT=${PORT:-50151}
METRICS_PORT=${METRICS_PORT:-9190}
WORKER_METRICS_PORT=${WORKER_METRICS_PORT:-9191}
STEPS=${STEPS:-150}
if [[ ! -f "$VOCAB_DIR/vocab.json" ]]; then
  echo "demo: the CLIP vocabulary is not at $VOCAB_DIR (set PERFUSION_CLIP_VOCAB_DIR)" >&2
  exit 1
fi
if [[ ! -f "$MODEL/model_index.json" ]]; then
  echo "demo: no model at $MODEL" >&2
  exit 1
fi

WORK=$(mktemp -d)
SERVER_PID="" WORKER_PID=""
cleanup() {
  local rc=$?
  [[ -n "$WORKER_PID" ]] && kill "$WORKER_PID" 2>/dev/null && wait "$WORKER_PID" 2>/dev/null || true
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  if [[ $rc -ne 0 ]]; then  # the logs explain the failure: show them before they go
    for log in "$WORK/server.log" "$WORK/worker.log"; do
      [[ -f "$log" ]] && { echo "demo: last lines of $log:" >&2; tail -30 "$log" >&2; }
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "demo-token demo" >"$WORK/tokens.txt"
echo "worker-token" >"$WORK/workers.txt"
echo "worker-token" >"$WORK/worker-token"
BIN="$BUILD_DIR"
# The server serves the model the worker runs (MODEL may name another folder).
MODEL_ID=$("$BIN/worker/perfusion-worker" --print_base_model_id --model_dir "$MODEL" --tokenizer_dir "$VOCAB_DIR")
"$BIN/server/perfusion-server" --listen "127.0.0.1:$PORT" --metrics_listen "127.0.0.1:$METRICS_PORT" \
  --data_dir "$WORK/data" --tokens_file "$WORK/tokens.txt" --worker_tokens_file "$WORK/workers.txt" \
  --vocab "$VOCAB_DIR/vocab.json" --base_model_id "$MODEL_ID" 2>"$WORK/server.log" &
SERVER_PID=$!
"$BIN/worker/perfusion-worker" --server "127.0.0.1:$PORT" --worker_token_file "$WORK/worker-token" \
  --model_dir "$MODEL" --tokenizer_dir "$VOCAB_DIR" --metrics_listen "127.0.0.1:$WORKER_METRICS_PORT" \
  2>"$WORK/worker.log" &
WORKER_PID=$!

export PERFUSION_SERVER="127.0.0.1:$PORT" PERFUSION_TOKEN=demo-token
CTL="$BIN/client/perfusionctl"
echo "demo: waiting for the server and the worker..."
ready=0
for _ in $(seq 1 120); do
  # Our processes first: a leftover server on the port must not pass for ours.
  if ! kill -0 "$SERVER_PID" 2>/dev/null || ! kill -0 "$WORKER_PID" 2>/dev/null; then
    echo "demo: the server or the worker exited" >&2
    exit 1
  fi
  if "$CTL" -q --rpc-timeout 2s health --service perfusion.v1.GenerationService >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 1
done
if [[ $ready -ne 1 ]]; then
  echo "demo: no generation worker was serving after 120 s" >&2
  exit 1
fi
"$CTL" health --service perfusion.v1.GenerationService

# Two concepts the base model has never seen: a two-colour checkered star and a striped heart.
"$BIN/worker/tools/perfusion-render-shapes" --out "$WORK/checker" --n 8 --seed 1 --concept checker_star >/dev/null
"$BIN/worker/tools/perfusion-render-shapes" --out "$WORK/candy" --n 8 --seed 2 --concept candy_heart >/dev/null
rm -f "$WORK"/checker/captions.tsv "$WORK"/candy/captions.tsv

echo "demo: training <checker> (superclass star) and <candy> (superclass heart), $STEPS steps each"
# Bounded: a worker that died mid-training would leave the job queued for no one.
"$CTL" train "$WORK/checker" --superclass star --name checker --steps "$STEPS" --seed 1 --timeout 30m
"$CTL" train "$WORK/candy" --superclass heart --name candy --steps "$STEPS" --seed 2 --timeout 30m
"$CTL" concepts list

mkdir -p "$OUT"
echo "demo: generating"
"$CTL" generate "a photo of a <checker> on a blue background" -o "$OUT" --n 4 --seed 10 --steps 30 --prefix checker
"$CTL" generate "a <candy> in the top left" -o "$OUT" --n 4 --seed 20 --steps 30 --prefix candy
"$CTL" generate "a <checker> and a <candy> on a green background" -o "$OUT" --n 4 --seed 30 --steps 30 --prefix both
# The base model gives both objects the last noun's shape; regional prompts place each concept.
"$CTL" generate "a <checker> to the left of a <candy> on a blue background" -o "$OUT" --n 4 --seed 40 --steps 30 \
  --prefix regions --region "left:a small <checker> on the left on a blue background" \
  --region "right:a small <candy> on the right on a blue background"
echo "demo: images in $OUT:"
ls -1 "$OUT"
