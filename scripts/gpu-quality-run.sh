#!/usr/bin/env bash
# A fixed-time quality run on one CUDA GPU: builds the engine's tools against the machine's CUDA
# LibTorch, trains a 16x16-latent tiny base model for a fixed number of minutes, trains its
# classifier, and scores the four builtin concepts with the quick harness (three seeds). The results
# fit a few files, so a machine lent for minutes gives back a model and its figures.
#
# This is what docs/quality.md ("What would close the gap") asks for: far more UNet training than two
# CPU cores give. It needs no Debian packages: g++ (C++17) and a LibTorch with CUDA (PyTorch's own is
# found through python3), and CMake + Ninja for the first build path. nlohmann/json.hpp and,
# optionally, libpng and GoogleTest come from the system or from EXTRA_PREFIX.
#
#   scripts/gpu-quality-run.sh                                   # defaults below
#   scripts/gpu-quality-run.sh --pack-extra DIR                  # on a Debian 12 machine with the
#       build dependencies: copy nlohmann/json.hpp, libpng and zlib (headers, static libraries) into
#       DIR, for EXTRA_PREFIX=DIR on a machine that has only a compiler, CMake and a CUDA LibTorch
#   TRAIN_MINUTES=20 OUT=/tmp/q TOKENIZER_DIR=../shared/data/clip scripts/gpu-quality-run.sh
#
# Settings (environment):
#   OUT            where the results go (default out/gpu-quality): report.md, logs.tar.gz (logs, the
#                  harness's pictures, the VAE check) and model.tar.gz in parts of at most 15 MB
#                  (model.tar.gz.part-aa, -ab: `cat model.tar.gz.part-* | tar xz` gives model/)
#   SCRATCH        the work folder (checkpoints, about 130 MB) and the model (default
#                  ${TMPDIR:-/tmp}/perfusion-gpu-quality-<hash of OUT>, outside OUT, whose files must
#                  stay small); a
#                  rerun with the same SCRATCH continues the training where it ended
#   TOKENIZER_DIR  CLIP vocab.json + merges.txt (default ../shared/data/clip)
#   TORCH_PREFIX   LibTorch's CMake prefix (default: python3's torch.utils.cmake_prefix_path)
#   EXTRA_PREFIX   a folder with include/nlohmann/json.hpp and optionally include/png.h + lib/libpng16.a
#                  + lib/libz.a and include/gtest + lib/libgtest{,_main}.a, for machines without them
#                  (default: none; --pack-extra makes one)
#   TRAIN_MINUTES  base model budget from the tool's start, rendering and the VAE stage included (default 4;
#                  0.5 with SMOKE=1); the UNet trains until it runs out, then the model is written and
#                  packed into OUT at once, so a later step that fails or runs out of time cannot lose it
#   CLF_MINUTES    limit of the classifier step (default 4), EVAL_MINUTES of the harness (default 8)
#   UNET_BATCH     UNet batch (default 256: a GPU step costs about the same at 64 and at 256)
#   RECIPE         open (default): after the VAE, the UNet trains on v4o's world from its first step
#                  (--pair-prob 0.3 two-object scenes, --open-textures 0.4: base objects wear the
#                  concept patterns in other colour pairs, so each concept is a new combination of
#                  parts the UNet draws); plain: v4's world (the UNet stage alone)
#   SAMPLES        rendered scenes per world (default 100000; the CPU runs used 30000)
#   DEVICE         default cuda
#   SEEDS          harness seeds (default 1,2,3)
#   TOOLS_DIR      use tools already built there instead of building (e.g. build/worker/tools)
#   BUILD          cmake (default; falls back to direct when CMake cannot configure or build against
#                  this LibTorch) or direct: g++ on the sources with LibTorch's include and library
#                  folders, no CMake package involved (TORCH_INCLUDES, TORCH_LIBDIR, TORCH_ABI override
#                  what python3's torch says)
#   CUDA_TESTS     1 (default): with a cuda DEVICE, first build and run the engine's CUDA tests (concept
#                  training and generation on the GPU against the CPU; needs GoogleTest, see --pack-extra)
#   SMOKE=1        a dry run of every step at toy sizes (a few minutes on a CPU): check the script and
#                  the tools on a machine of your own before spending a lent GPU's minutes
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [[ "${1:-}" == "--pack-extra" ]]; then
  dir=${2:?--pack-extra needs a folder}
  lib=/usr/lib/x86_64-linux-gnu
  mkdir -p "$dir/include" "$dir/lib"
  cp -r /usr/include/nlohmann "$dir/include/"
  cp /usr/include/{png.h,pngconf.h,pnglibconf.h,zlib.h,zconf.h} "$dir/include/"
  cp "$lib/libpng16.a" "$lib/libz.a" "$dir/lib/"
  cp -r /usr/include/gtest "$dir/include/"  # GoogleTest, for the engine's CUDA tests
  cp "$lib/libgtest.a" "$lib/libgtest_main.a" "$dir/lib/"
  echo "gpu-quality: packed $(du -sh "$dir" | cut -f1) into $dir"
  exit 0
fi
[[ $# -eq 0 ]] || { echo "gpu-quality: settings are environment variables (see the top of $0)" >&2; exit 2; }
OUT=${OUT:-$ROOT/out/gpu-quality}
TOKENIZER_DIR=${TOKENIZER_DIR:-$(cd "$ROOT/.." && pwd)/shared/data/clip}
SMOKE=${SMOKE:-0}
TRAIN_MINUTES=${TRAIN_MINUTES:-$([[ "$SMOKE" == 1 ]] && echo 0.5 || echo 4)}
UNET_BATCH=${UNET_BATCH:-256}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-1,2,3}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-gpu}
# One scratch folder per OUT by default: a run must not resume another run's checkpoints.
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/perfusion-gpu-quality-$(printf %s "$OUT" | sha1sum | cut -c1-8)}
CLF_MINUTES=${CLF_MINUTES:-4}
EVAL_MINUTES=${EVAL_MINUTES:-8}
mkdir -p "$OUT" "$SCRATCH"
log() { echo "[gpu-quality $(date +%H:%M:%S)] $*"; }

if [[ ! -f "$TOKENIZER_DIR/vocab.json" || ! -f "$TOKENIZER_DIR/merges.txt" ]]; then
  echo "gpu-quality: no CLIP vocab.json + merges.txt in $TOKENIZER_DIR (set TOKENIZER_DIR)" >&2
  exit 1
fi
if [[ -n "${EXTRA_PREFIX:-}" && ! -d "$EXTRA_PREFIX" ]]; then
  echo "gpu-quality: EXTRA_PREFIX $EXTRA_PREFIX is not a folder" >&2
  exit 1
fi
# Absolute paths: the compilers run in the build folder, the tools in the repository.
abspath() { mkdir -p "$1" && (cd "$1" && pwd); }
TOKENIZER_DIR=$(cd "$TOKENIZER_DIR" && pwd) OUT=$(abspath "$OUT") SCRATCH=$(abspath "$SCRATCH")
BUILD_DIR=$(abspath "$BUILD_DIR")
[[ -z "${EXTRA_PREFIX:-}" ]] || EXTRA_PREFIX=$(cd "$EXTRA_PREFIX" && pwd)
SHARED_DIR=$(dirname "$(dirname "$TOKENIZER_DIR")")
BUILD=${BUILD:-cmake}
TOOLS=(train_base train_classifier evaluate)
D_FLAGS=() ENGINE_OBJS=() DIRECT_EXTRA_FLAGS=()

# CMake with LibTorch's own package (what CI and the Dockerfile use).
cmake_build() {
  if [[ -z "${TORCH_PREFIX:-}" ]]; then
    TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null) || {
      log "no TORCH_PREFIX and python3 has no torch"
      return 1
    }
  fi
  local args=(-S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPERFUSION_ENGINE_ONLY=ON
              -DPERFUSION_BUILD_TESTS=OFF -DPERFUSION_BUILD_BENCH=OFF -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
              -DPERFUSION_SHARED_DIR="$SHARED_DIR")
  if [[ -n "${EXTRA_PREFIX:-}" ]]; then
    args+=(-DCMAKE_CXX_FLAGS="-I$EXTRA_PREFIX/include")
    if [[ -f "$EXTRA_PREFIX/lib/libpng16.a" ]]; then
      args+=(-DPNG_PNG_INCLUDE_DIR="$EXTRA_PREFIX/include" -DPNG_LIBRARY="$EXTRA_PREFIX/lib/libpng16.a"
             -DZLIB_INCLUDE_DIR="$EXTRA_PREFIX/include" -DZLIB_LIBRARY="$EXTRA_PREFIX/lib/libz.a")
    fi
  fi
  log "cmake: configure against $TORCH_PREFIX"
  cmake "${args[@]}" >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; return 1; }
  grep -q "PERFUSION_HAVE_PNG" "$BUILD_DIR/build.ninja" ||
    log "warning: no libpng; the tools' PNG sheets will fail (set EXTRA_PREFIX)"
  log "cmake: build"
  local targets=() t
  for t in "${TOOLS[@]}"; do targets+=("perfusion-${t//_/-}"); done
  cmake --build "$BUILD_DIR" --target "${targets[@]}" >"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; return 1; }
  BIN=$BUILD_DIR/worker/tools
  ENGINE_OBJS=("$BUILD_DIR/worker/perfusion/libperfusion_engine.a")
}

# The compiler and linker settings for LibTorch without its CMake package: D_FLAGS, D_LIBS (libpng),
# D_TORCH_LIBS, D_LIBDIR.
direct_setup() {
  local incs=${TORCH_INCLUDES:-} abi=${TORCH_ABI:-} inc l
  D_LIBDIR=${TORCH_LIBDIR:-}
  if [[ -z "$incs" || -z "$D_LIBDIR" || -z "$abi" ]]; then
    read -r abi D_LIBDIR incs < <(python3 -c 'import os, torch
from torch.utils import cpp_extension as c
print(int(torch.compiled_with_cxx11_abi()), os.path.join(os.path.dirname(torch.__file__), "lib"), " ".join(c.include_paths()))') ||
      { log "direct: python3 has no torch; set TORCH_INCLUDES, TORCH_LIBDIR and TORCH_ABI"; return 1; }
  fi
  D_FLAGS=(-O2 -std=c++17 -fPIC "-D_GLIBCXX_USE_CXX11_ABI=$abi" -I"$ROOT/worker" -I"$ROOT"
           "-DPERFUSION_DEFAULT_SHARED=\"$SHARED_DIR\"")
  D_LIBS=()
  for inc in $incs; do D_FLAGS+=(-isystem "$inc"); done
  if [[ -n "${EXTRA_PREFIX:-}" ]]; then D_FLAGS+=(-I"$EXTRA_PREFIX/include"); fi
  if [[ -n "${EXTRA_PREFIX:-}" && -f "$EXTRA_PREFIX/lib/libpng16.a" ]]; then
    D_FLAGS+=(-DPERFUSION_HAVE_PNG=1); D_LIBS+=("$EXTRA_PREFIX/lib/libpng16.a" "$EXTRA_PREFIX/lib/libz.a")
  elif echo '#include <png.h>' | g++ "${D_FLAGS[@]}" -E -x c++ - >/dev/null 2>&1; then
    D_FLAGS+=(-DPERFUSION_HAVE_PNG=1); D_LIBS+=(-lpng16 -lz)
  else
    log "warning: no libpng; the tools' PNG sheets will fail (set EXTRA_PREFIX)"
  fi
  D_TORCH_LIBS=()
  for l in torch torch_cpu torch_cuda c10_cuda c10; do
    [[ -e "$D_LIBDIR/lib$l.so" ]] && D_TORCH_LIBS+=("-l$l")
  done
  log "direct: LibTorch from $D_LIBDIR (${D_TORCH_LIBS[*]}, C++11 ABI $abi)"
}

# Compiles sources ($2...) into objects in folder $1, in parallel: <parent folder>_<name>.o.
direct_compile() {
  local dir=$1 cxx=g++
  shift
  mkdir -p "$dir"
  command -v ccache >/dev/null && cxx="ccache g++"
  printf '%s\n' "${D_FLAGS[@]}" >"$dir/flags"  # read back per file, which keeps the quoting
  printf '%s\n' "$@" | xargs -P "$(nproc)" -I{} bash -c '
    src={}; obj='"$dir"'/$(basename "$(dirname "$src")")_$(basename "$src" .cc).o
    mapfile -t f <'"$dir"'/flags
    [[ "$obj" -nt "$src" ]] || '"$cxx"' "${f[@]}" "${@}" -c "$src" -o "$obj"' _ "${DIRECT_EXTRA_FLAGS[@]}"
}

# Links objects and libraries ($2...) with LibTorch into executable $1. libtorch_cuda is linked even
# though nothing names it: it registers the CUDA backend when it loads.
direct_link() {
  local exe=$1
  shift
  g++ -o "$exe" "$@" -L"$D_LIBDIR" -Wl,-rpath,"$D_LIBDIR" -Wl,--no-as-needed "${D_TORCH_LIBS[@]}" -Wl,--as-needed \
    "${D_LIBS[@]}" -lpthread
}

# g++ straight on the sources: needs only LibTorch's headers and libraries.
direct_build() {
  direct_setup || return 1
  local dir=$BUILD_DIR/direct srcs=("$ROOT"/worker/perfusion/*.cc) t
  for t in "${TOOLS[@]}"; do srcs+=("$ROOT/worker/tools/$t.cc"); done
  DIRECT_EXTRA_FLAGS=()
  direct_compile "$dir" "${srcs[@]}" >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  mkdir -p "$dir/bin"
  for t in "${TOOLS[@]}"; do
    direct_link "$dir/bin/perfusion-${t//_/-}" "$dir/tools_$t.o" "$dir"/perfusion_*.o >>"$OUT/build.log" 2>&1 ||
      { tail -40 "$OUT/build.log"; return 1; }
  done
  BIN=$dir/bin
  ENGINE_OBJS=("$dir"/perfusion_*.o)
}

# The engine's CUDA tests (training and generation on the GPU against the CPU, the schedulers, the
# multi-tensor AdamW step against torch's):
# needs GoogleTest (from EXTRA_PREFIX, see --pack-extra, or the system). Never fatal: the quality
# run goes on, and the log says what happened.
cuda_tests() {
  local dir=$BUILD_DIR/cuda-tests gtest_lib
  if [[ -n "${EXTRA_PREFIX:-}" && -f "$EXTRA_PREFIX/lib/libgtest.a" ]]; then
    gtest_lib=("$EXTRA_PREFIX/lib/libgtest_main.a" "$EXTRA_PREFIX/lib/libgtest.a")
  else
    gtest_lib=(-lgtest_main -lgtest)
  fi
  [[ ${#D_FLAGS[@]} -gt 0 ]] || direct_setup || return 1
  if [[ ${#ENGINE_OBJS[@]} -eq 0 ]]; then  # tools from TOOLS_DIR: compile the engine here
    DIRECT_EXTRA_FLAGS=()
    direct_compile "$BUILD_DIR/direct" "$ROOT"/worker/perfusion/*.cc || return 1
    ENGINE_OBJS=("$BUILD_DIR/direct"/perfusion_*.o)
  fi
  DIRECT_EXTRA_FLAGS=("-DPERFUSION_SHARED_DIR=\"$SHARED_DIR\"" "-DPERFUSION_SOURCE_DIR=\"$ROOT\"")
  direct_compile "$dir" "$ROOT"/tests/engine/{pipeline_test,scheduler_test,foreach_optim_test,test_util}.cc || return 1
  direct_link "$dir/cuda_tests" "$dir"/engine_*.o "${ENGINE_OBJS[@]}" "${gtest_lib[@]}" || return 1
  "$dir/cuda_tests" --gtest_filter='*Cuda*'
}

if [[ -n "${TOOLS_DIR:-}" ]]; then
  BIN=$TOOLS_DIR
elif [[ "$BUILD" == direct ]]; then
  direct_build || exit 1
elif ! cmake_build; then
  log "cmake could not build against this LibTorch; trying the direct build"
  direct_build || exit 1
fi
if [[ "$DEVICE" == cuda* && "${CUDA_TESTS:-1}" == 1 ]]; then
  log "engine CUDA tests"
  if ! cuda_tests >"$OUT/cuda_tests.log" 2>&1; then
    log "engine CUDA tests FAILED or could not build (see cuda_tests.log); the quality run goes on"
  elif grep -q "SKIPPED" "$OUT/cuda_tests.log"; then
    log "engine CUDA tests skipped: this LibTorch sees no GPU"
  else
    log "engine CUDA tests passed"
  fi
  tail -25 "$OUT/cuda_tests.log"
fi
# Before any training: the tools start (their libraries load) and take the device. A bad --samples
# makes the check exit right after the flags are read; a device the build cannot use is named.
check=$("$BIN/perfusion-train-base" --device "$DEVICE" --samples 0 2>&1) || true
if [[ "$check" == *"--device"* || "$check" != *"--samples"* ]]; then
  echo "gpu-quality: the tools cannot run on $DEVICE: $check" >&2
  exit 1
fi

# Sizes: the real run, or a toy one that exercises the same steps.
BASE_SIZES=(--samples "${SAMPLES:-100000}" --vae-steps 6000 --vae-batch 64 --unet-batch "$UNET_BATCH"
            --checkpoint-every 1000)
case "${RECIPE:-open}" in
  open) STEPS=(--unet-steps 0 --pair-steps 1000000 --pair-prob 0.3 --open-textures 0.4) ;;
  plain) STEPS=(--unet-steps 1000000) ;;
  *) echo "gpu-quality: RECIPE must be open or plain" >&2; exit 2 ;;
esac
CLF_SIZES=()
EVAL_SIZES=(--per-prompt 8 --seeds "$SEEDS")
if [[ "$SMOKE" == 1 ]]; then
  BASE_SIZES=(--samples 256 --vae-steps 4 --vae-batch 8 --unet-batch 8 --cov-captions 64 --checkpoint-every 2)
  CLF_SIZES=(--train 256 --test 64 --steps 4 --batch 16)
  EVAL_SIZES=(--per-prompt 2 --seeds 1 --concepts candy_heart --steps 2 --gen-steps 2)
fi

MODEL=$SCRATCH/model
WORK=$SCRATCH/work
log "base model: $TRAIN_MINUTES min on $DEVICE, ${RECIPE:-open} recipe"
# The v4 model (docs/quality.md, models/tiny/README.md) with a GPU's batch and more scenes, ended by time.
"$BIN/perfusion-train-base" --device "$DEVICE" --work "$WORK" --out "$MODEL" --tokenizer-dir "$TOKENIZER_DIR" \
  --latent-size 16 --latent-channels 8 --vae-blocks 32,64 --vae-edge-weight 1 --unet-blocks 32,64,128 \
  --decoder-steps 0 --model-id perfusion-tiny-gpu --max-minutes "$TRAIN_MINUTES" --finish "${BASE_SIZES[@]}" \
  "${STEPS[@]}" \
  2>&1 | tee "$OUT/train_base.log"
# The model in OUT now (parts of at most 15 MB): the minutes that made it are the expensive part.
pack_model() {
  rm -f "$OUT"/model.tar.gz.part-*
  tar -C "$SCRATCH" -czf - model | split -b 15m - "$OUT/model.tar.gz.part-"
}
pack_model
log "classifier (at most $CLF_MINUTES min)"
timeout "${CLF_MINUTES}m" "$BIN/perfusion-train-classifier" --device "$DEVICE" --model "$MODEL" \
  --out "$MODEL/eval/classifier.safetensors" --vae-fraction 0.3 "${CLF_SIZES[@]}" 2>&1 | tee "$OUT/classifier.log"
pack_model  # with its classifier
log "quick harness (at most $EVAL_MINUTES min)"
timeout "${EVAL_MINUTES}m" "$BIN/perfusion-evaluate" --device "$DEVICE" --model "$MODEL" --out "$SCRATCH/eval" \
  --tokenizer-dir "$TOKENIZER_DIR" --no-ablations --no-sweep "${EVAL_SIZES[@]}" 2>&1 | tee "$OUT/evaluate.log"
log "results"
cp "$SCRATCH/eval/report.md" "$OUT/report.md"
cp "$WORK/state.json" "$WORK/vae_check.png" "$SCRATCH/eval/"
(cd "$OUT" && tar -czf logs.tar.gz ./*.log -C "$SCRATCH" eval)
rm -f "$OUT"/*.log  # inside logs.tar.gz now; a failed step leaves its log here instead
log "done: $OUT/report.md, $OUT/logs.tar.gz, $(cd "$OUT" && echo model.tar.gz.part-*)"
