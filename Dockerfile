# syntax=docker/dockerfile:1
#
# qwen3-moe-serve. A builder stage compiles llama-cpp-python (llama.cpp with CUDA, or for the
# CPU) into a virtual environment; the runtime stage receives that environment and nothing else
# of the toolchain (no nvcc, compilers or headers), and runs as an unprivileged user.
#
#   docker build -t qwen3-moe-serve:cuda .                              CUDA (the default)
#   docker build --build-arg CUDA_ARCHITECTURES=90 -t qwen3-moe-serve:cuda .   H100/H200 only
#   docker build --build-arg BACKEND=cpu -t qwen3-moe-serve:cpu .        CPU only, no CUDA
#
# The backend picks the base images below by stage name (FROM build-${BACKEND}), which needs
# BuildKit (the default builder since Docker 23); it skips the stages the other backend uses.
# The image's CUDA version must not be newer than the host driver supports: CUDA 12.8 needs an
# R570 driver or newer (`nvidia-smi` prints the highest CUDA version the driver supports), else
# build with an older CUDA_VERSION, e.g. 12.6.3.

ARG BACKEND=cuda
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

# -- builders: one per backend, chosen by BACKEND -------------------------------------------

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
# Compute capabilities to compile kernels for: 75 T4, 80 A100, 86 A10/RTX 30, 89 L4/L40/RTX 40,
# 90 H100/H200. Each one adds minutes to the build; name only yours to build faster.
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
# GGML_NATIVE=off: the CPU code must not depend on the build machine's processor.
# GGML_RPC=on: the server can use llama.cpp RPC workers (rpc_servers) and be one.
# LLAVA_BUILD=off: no multimodal library, which a text model does not use.
ENV CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} \
    -DGGML_NATIVE=off -DGGML_RPC=on -DLLAVA_BUILD=off"

FROM ubuntu:${UBUNTU_VERSION} AS build-cpu
ENV CMAKE_ARGS="-DGGML_CUDA=off -DGGML_NATIVE=off -DGGML_RPC=on -DLLAVA_BUILD=off"

# hadolint ignore=DL3006
FROM build-${BACKEND} AS build
# Unpinned apt packages (DL3008): the base image pins the release; its point updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake ninja-build python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# The compile (minutes) gets a layer of its own, ahead of the application, so that changing the
# application does not recompile llama.cpp. No pip cache here: pip's wheel cache does not know
# CMAKE_ARGS and would hand a CPU wheel to a CUDA build.
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG EXTRA_CMAKE_ARGS=""
RUN CMAKE_ARGS="${CMAKE_ARGS} ${EXTRA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# (No import check here: a CUDA llama_cpp loads libcuda.so.1, which only a GPU host provides.)
RUN pip install --no-cache-dir .

# -- runtimes: the matching slim base, chosen by BACKEND -----------------------------------

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime-cuda

FROM ubuntu:${UBUNTU_VERSION} AS runtime-cpu
# The RPC backend counts as one that layers can be offloaded to: with no RPC servers given, a
# CPU image keeps every layer on the CPU, and its log says gpu_offload=False.
ENV QWEN3_MOE_SERVE_N_GPU_LAYERS=0

# hadolint ignore=DL3006
FROM runtime-${BACKEND} AS runtime
# libgomp1: ggml's CPU backend uses OpenMP. The runtime's python3 is the builder's (same
# Ubuntu release), so the copied environment's interpreter links resolve.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 qwen \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/qwen \
        --shell /usr/sbin/nologin qwen \
    && mkdir -p /models /var/cache/qwen3-moe-serve \
    && chown 10001:10001 /var/cache/qwen3-moe-serve

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/qwen3-moe-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/qwen3-moe-healthcheck
COPY --chmod=0755 deploy/rpc_worker.py /usr/local/bin/qwen3-moe-rpc-worker

# Inside a container the server must listen on every interface (outside, it defaults to
# loopback); the cache directory holds the demo model, built on first start when no model is
# mounted; QWEN3_DEMO_FALLBACK is read by the entrypoint.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QWEN3_MOE_SERVE_HOST=0.0.0.0 \
    QWEN3_MOE_SERVE_PORT=8000 \
    QWEN3_MOE_SERVE_CACHE_DIR=/var/cache/qwen3-moe-serve \
    QWEN3_DEMO_FALLBACK=1

USER 10001:10001
WORKDIR /home/qwen
EXPOSE 8000
# /health is 503 while the model loads: a 17 GB GGUF from a slow disk takes minutes, which
# the start period absorbs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD ["qwen3-moe-healthcheck", "/health"]
ENTRYPOINT ["qwen3-moe-entrypoint"]
