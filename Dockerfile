# syntax=docker/dockerfile:1.6
# perfusion-serve images. Build from the repository root with the shared reference-data folder as
# a second (BuildKit named) context: it holds the CLIP tokenizer files the tiny model needs.
#
#   docker buildx build --build-context shared=../shared --target server     -t perfusion-server:0.1.0 .
#   docker buildx build --build-context shared=../shared --target worker     -t perfusion-worker:0.1.0 .
#   docker buildx build --build-context shared=../shared --target worker-cuda -t perfusion-worker-cuda:0.1.0 .
#
# Dependencies come from scripts/install-deps.sh only, the script the README and CI use
# (build packages in the builders, `--runtime` in the images); tests/deploy checks that. The CUDA
# stages add only what Debian does not package: NVIDIA's CUDA toolkit and a CUDA LibTorch.
# docs/deploy.md explains the stages, the build arguments and how to run the images.

ARG DEBIAN_IMAGE=debian:12
ARG DEBIAN_SLIM_IMAGE=debian:12-slim

# ---------------------------------------------------------------------------------------------
# builder: the CPU build (Debian's LibTorch 1.13), as in the README.
FROM ${DEBIAN_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
# The README's configure line; tests and benchmarks are not built into images.
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPERFUSION_BUILD_TESTS=OFF -DPERFUSION_BUILD_BENCH=OFF \
    && cmake --build build -j "$(nproc)" --target perfusion-server perfusion-worker perfusionctl
# The tiny model with its tokenizer (from the shared context), and the default flag files that
# point the binaries at it. The server's --base_model_id is what the worker reports for the model.
COPY models/tiny /opt/perfusion/models/tiny
COPY --from=shared data/clip/vocab.json data/clip/merges.txt /opt/perfusion/models/tiny/tokenizer/
RUN mkdir -p /opt/perfusion/etc \
    && base_model_id="$(build/worker/perfusion-worker --print_base_model_id \
           --model_dir=/opt/perfusion/models/tiny)" \
    && test -n "${base_model_id}" \
    && printf '%s\n' \
        '# Image defaults; later --flagfile and flags override them.' \
        '--listen=0.0.0.0:50051' \
        '--metrics_listen=0.0.0.0:9090' \
        '--data_dir=/var/lib/perfusion' \
        "--base_model_id=${base_model_id}" \
        '--vocab=/opt/perfusion/models/tiny/tokenizer/vocab.json' \
        > /opt/perfusion/etc/server.flags \
    && printf '%s\n' \
        '# Image defaults; later --flagfile and flags override them.' \
        '--model_dir=/opt/perfusion/models/tiny' \
        '--metrics_listen=0.0.0.0:9091' \
        > /opt/perfusion/etc/worker.flags

# ---------------------------------------------------------------------------------------------
# runtime: an unprivileged user on debian:12-slim, no compiler, no headers. Each image adds only
# the shared libraries its binaries load (scripts/install-deps.sh --runtime=KIND): Debian's
# LibTorch pulls in OpenCV, Qt and codecs (about 1 GB), which only the CPU worker needs.
FROM ${DEBIAN_SLIM_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --system --gid 10001 perfusion \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/perfusion \
        --shell /usr/sbin/nologin perfusion \
    && install -d -o perfusion -g perfusion -m 0750 /var/lib/perfusion
ENV LANG=C.UTF-8
COPY scripts/install-deps.sh /opt/perfusion/install-deps.sh

FROM runtime AS runtime-server
RUN /opt/perfusion/install-deps.sh --runtime=server && rm -rf /var/lib/apt/lists/*

FROM runtime AS runtime-worker
RUN /opt/perfusion/install-deps.sh --runtime=worker && rm -rf /var/lib/apt/lists/*

FROM runtime AS runtime-worker-cuda
RUN /opt/perfusion/install-deps.sh --runtime=worker-cuda && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# server: perfusion-server and perfusionctl (the HEALTHCHECK's gRPC health client).
#   docker run -p 50051:50051 -v perfusion-data:/var/lib/perfusion \
#     -v "$PWD/tokens:/etc/perfusion/tokens:ro" perfusion-server:0.1.0
FROM runtime-server AS server
COPY --from=builder /src/build/server/perfusion-server /src/build/client/perfusionctl /usr/local/bin/
COPY --from=builder /opt/perfusion/etc/server.flags /opt/perfusion/etc/server.flags
COPY --from=builder /opt/perfusion/models/tiny/tokenizer/vocab.json /opt/perfusion/models/tiny/tokenizer/vocab.json
USER 10001:10001
WORKDIR /var/lib/perfusion
VOLUME ["/var/lib/perfusion"]
EXPOSE 50051 9090
# grpc.health.v1 Check of the whole server (""): SERVING while up, NOT_SERVING while draining.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["perfusionctl", "--server=127.0.0.1:50051", "--rpc-timeout=3s", "--quiet", "health", "--service="]
ENTRYPOINT ["perfusion-server", "--flagfile=/opt/perfusion/etc/server.flags"]
CMD ["--tokens_file=/etc/perfusion/tokens/tokens.txt", "--worker_tokens_file=/etc/perfusion/tokens/worker_tokens.txt"]

# ---------------------------------------------------------------------------------------------
# builder-cuda: the worker against a CUDA LibTorch (2.x, cxx11 ABI, CUDA 12.4) on the same
# Debian 12 and the same install-deps.sh; CUDA and LibTorch come from NVIDIA and PyTorch.
FROM ${DEBIAN_IMAGE} AS builder-cuda
ARG CUDA_REPO=https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64
ARG CUDA_VERSION=12-4
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu124/libtorch-cxx11-abi-shared-with-deps-2.5.1%2Bcu124.zip
# Compute capabilities to compile for: A100 8.0, A10/RTX 30 8.6, L4/L40/RTX 40 8.9, H100 9.0.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
# CUDA-only additions (Debian 12 packages no CUDA 12): nvcc and the CUDA headers and libraries
# that LibTorch's CMake package looks for, from NVIDIA's Debian 12 repository.
ADD ${CUDA_REPO}/cuda-keyring_1.1-1_all.deb /tmp/cuda-keyring.deb
RUN dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends "cuda-toolkit-${CUDA_VERSION}" unzip \
    && rm -rf /var/lib/apt/lists/*
ADD ${LIBTORCH_URL} /tmp/libtorch.zip
RUN unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
ENV PATH=/usr/local/cuda/bin:${PATH}
COPY . .
# Torch_DIR / CMAKE_PREFIX_PATH pick the CUDA LibTorch over Debian's CPU one.
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPERFUSION_BUILD_TESTS=OFF -DPERFUSION_BUILD_BENCH=OFF \
        -DCMAKE_PREFIX_PATH=/opt/libtorch -DTorch_DIR=/opt/libtorch/share/cmake/Torch \
        -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
        -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    && cmake --build build -j "$(nproc)" --target perfusion-worker
COPY models/tiny /opt/perfusion/models/tiny
COPY --from=shared data/clip/vocab.json data/clip/merges.txt /opt/perfusion/models/tiny/tokenizer/
RUN mkdir -p /opt/perfusion/etc \
    && printf '%s\n' \
        '# Image defaults; later --flagfile and flags override them.' \
        '--model_dir=/opt/perfusion/models/tiny' \
        '--metrics_listen=0.0.0.0:9091' \
        '--device=cuda' \
        '--dtype=fp16' \
        > /opt/perfusion/etc/worker.flags

# ---------------------------------------------------------------------------------------------
# worker-cuda: the CUDA worker. LibTorch's lib/ carries the CUDA runtime, cuBLAS and cuDNN; the
# NVIDIA container toolkit mounts the driver. Run with --gpus all (docker) or an nvidia.com/gpu
# limit (deploy/overlays/gpu).
FROM runtime-worker-cuda AS worker-cuda
COPY --from=builder-cuda /opt/libtorch/lib /opt/libtorch/lib
COPY --from=builder-cuda /src/build/worker/perfusion-worker /usr/local/bin/
COPY --from=builder-cuda /opt/perfusion /opt/perfusion
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/libtorch/lib \
    CUDA_CACHE_PATH=/tmp/.nv
USER 10001:10001
WORKDIR /var/lib/perfusion
EXPOSE 9091
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9091 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["perfusion-worker", "--flagfile=/opt/perfusion/etc/worker.flags"]
CMD ["--server=perfusion-server:50051"]

# ---------------------------------------------------------------------------------------------
# worker (the default target): the CPU worker with the tiny model; the worker token comes from
# PERFUSION_WORKER_TOKEN or --worker_token_file.
#   docker run -e PERFUSION_WORKER_TOKEN=... perfusion-worker:0.1.0 --server=HOST:50051
FROM runtime-worker AS worker
COPY --from=builder /src/build/worker/perfusion-worker /usr/local/bin/
COPY --from=builder /opt/perfusion/models /opt/perfusion/models
COPY --from=builder /opt/perfusion/etc/worker.flags /opt/perfusion/etc/worker.flags
USER 10001:10001
WORKDIR /var/lib/perfusion
EXPOSE 9091
# The worker serves no gRPC (it dials the server): its health is GET /healthz on the metrics
# port, which opens once the model is loaded. bash's /dev/tcp keeps curl out of the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9091 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["perfusion-worker", "--flagfile=/opt/perfusion/etc/worker.flags"]
CMD ["--server=perfusion-server:50051"]
