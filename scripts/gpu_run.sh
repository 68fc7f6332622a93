#!/usr/bin/env bash
# The one command on the GPU machine (docs/gpu.md), from the repository root: the carried
# wheels installed beside the image's packages, then the benchmark, writing into OUT_DIR.
#   scripts/gpu_run.sh OUT_DIR [python -m benchmarks.gpu options, e.g. --small]
# PYTHON (python3), GPU_WHEELS (build/gpu-wheels) and GPU_SITE (/tmp/gpu-site) are there for
# the rehearsal (scripts/gpu_rehearsal.sh), which runs this same file.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_run.sh OUT_DIR [options]}")
shift
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
# Absolute: the system part's processes start in folders of their own.
SITE=$(realpath -m "${GPU_SITE:-/tmp/gpu-site}")

# No index (the machine has no network), no dependencies (the image has the rest: a resolver
# would try to reinstall them), no byte-compiling (seconds of the budget for files never run).
started=$SECONDS
rm -rf "$SITE"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
echo "gpu_run.sh: installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $((SECONDS - started)) s"
# On PYTHONPATH, not only on this process's sys.path: the system part's worker, S3 server
# and redis-server are processes of their own.
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m benchmarks.gpu --out-dir "$OUT" "$@"
