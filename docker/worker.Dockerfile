# syntax=docker/dockerfile:1
# GPU worker image: CUDA runtime, torch, the package with its [worker] extra.
#   docker build -f docker/worker.Dockerfile -t face-refinery-worker .
# Model weights are never in the image. They download on first start into the Hugging Face
# cache (HF_HOME, a volume, so a restart does not fetch them again), or are mounted
# read-only and named by REFINERY_MODEL_PATH / REFINERY_REFINER_PATH. HF_TOKEN (FLUX.1-dev
# is gated) comes from the container's environment at run time, never from a build arg.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch's own wheels carry the CUDA libraries; pick the index that matches the base image
# and the nodes' driver.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 24.04's python3 is 3.12; a venv keeps pip away from the system's packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned: left to resolve the [worker] range alone, pip may pick a build
# for another CUDA. Its own layer, so code changes do not download it again.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

WORKDIR /app
# The product packages only: no weights, no .env, no .venv, no devstack/ or tests/.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
COPY refiner ./refiner
COPY cli ./cli
RUN pip install ".[worker]"

# Non-root. The cache directories exist and belong to the user before VOLUME, so a fresh
# named volume mounted there inherits that ownership.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin refinery \
    && mkdir -p /cache/huggingface /cache/face-refinery \
    && chown -R refinery:refinery /cache
ENV HF_HOME=/cache/huggingface \
    REFINERY_MODEL_CACHE_DIR=/cache/face-refinery
VOLUME ["/cache/huggingface"]
USER 10001:10001

# Prometheus metrics (REFINERY_METRICS_PORT).
EXPOSE 9808
# No CMD: without --queues the worker serves the default queues (the kinds served by default).
ENTRYPOINT ["refinery", "worker"]
