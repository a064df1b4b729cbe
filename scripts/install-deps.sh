#!/usr/bin/env bash
# Installs every Debian 12 package perfusion-serve needs to build, test and run. Idempotent:
# packages already present are left alone. Needs root (or sudo).
#
#   scripts/install-deps.sh                        # build + test dependencies
#   scripts/install-deps.sh --runtime              # what the server and the CPU worker load at run time
#   scripts/install-deps.sh --runtime=server       # perfusion-server and perfusionctl only (no LibTorch)
#   scripts/install-deps.sh --runtime=worker       # the CPU worker (Debian's LibTorch 1.13)
#   scripts/install-deps.sh --runtime=worker-cuda  # the CUDA worker, whose LibTorch comes with it
set -euo pipefail
mode="${1:-}"
case "$mode" in
  "" | --runtime | --runtime=server | --runtime=worker | --runtime=worker-cuda) ;;
  -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "install-deps: unknown argument '$1' (--runtime[=server|worker|worker-cuda], or none)" >&2; exit 2 ;;
esac

BUILD_PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp           # LibTorch 1.13 (CPU); OpenBLAS makes matmul ~12x faster
  libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev grpc-proto
  libabsl-dev libssl-dev zlib1g-dev
  libsqlite3-dev libpng-dev libjpeg62-turbo-dev nlohmann-json3-dev
  libpq-dev postgresql                        # PostgreSQL store (optional) and its tests
  libgtest-dev libgmock-dev libbenchmark-dev
  yamllint python3-yaml prometheus            # deploy/ tests: YAML lint, promtool (rules, alerts)
  openssl                                     # TLS test: a throwaway self-signed certificate
)
# Run time, per image: Debian's libtorch1.13 pulls in OpenCV, Qt and codecs (about 1 GB), so only
# the CPU worker gets it. The CUDA worker loads the LibTorch it was built against from its own lib/.
RUNTIME_SERVER_PKGS=(libgrpc++1.51 libprotobuf32 libsqlite3-0 libpq5 ca-certificates)
RUNTIME_WORKER_CUDA_PKGS=(libgrpc++1.51 libprotobuf32 libpng16-16 libjpeg62-turbo ca-certificates)
RUNTIME_WORKER_PKGS=("${RUNTIME_WORKER_CUDA_PKGS[@]}" libtorch1.13 libopenblas0-openmp)

pkgs=("${BUILD_PKGS[@]}")
case "$mode" in
  --runtime) pkgs=("${RUNTIME_SERVER_PKGS[@]}" "${RUNTIME_WORKER_PKGS[@]}") ;;
  --runtime=server) pkgs=("${RUNTIME_SERVER_PKGS[@]}") ;;
  --runtime=worker) pkgs=("${RUNTIME_WORKER_PKGS[@]}") ;;
  --runtime=worker-cuda) pkgs=("${RUNTIME_WORKER_CUDA_PKGS[@]}") ;;
esac
if [[ -z "$mode" ]] && ! command -v npm >/dev/null 2>&1; then
  pkgs+=(nodejs npm)  # the independent gRPC reflection client the service tests use
fi

# kubectl for `kubectl kustomize` in the deploy/ tests; a machine that has one already (from
# another package that owns /usr/bin/kubectl) keeps it.
if [[ -z "$mode" ]] && ! command -v kubectl >/dev/null 2>&1; then
  pkgs+=(kubernetes-client)
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | awk '!seen[$0]++')  # lists overlap
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#pkgs[@]} packages already installed"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
if [[ -n "$SUDO" ]] && ! command -v sudo >/dev/null 2>&1; then
  echo "install-deps: not root and no sudo: run this as root to install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The postgresql and prometheus packages are here for their tools (the tests start their own
# throwaway PostgreSQL; promtool checks the rules). Keep apt from starting their system services:
# a Prometheus on :9090 would take perfusion-server's default --metrics_listen port.
# policy-rc.d is Debian's switch for that (invoke-rc.d asks it; 101 = "action not allowed").
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
