#!/usr/bin/env bash
# The wheels a bare GPU machine lacks to run `python -m benchmarks.gpu` (docs/gpu.md): the
# pinned list in scripts/gpu_wheels.txt, for CPython 3.12 on x86-64 Linux (the image's), then
# checked: every wheel installable there, at most 60 MiB in all (what a run can carry).
#   scripts/gpu_wheels.sh [DIR]                  # default build/gpu-wheels (git-ignored)
#   GPU_PYTHON=3.11 scripts/gpu_wheels.sh DIR    # the same versions for the rehearsal's Python
# Any python3 with pip will do (PYTHON to choose one). DIR is emptied first: a stale wheel of
# another version beside the new one would make the install fail or pick either.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-build/gpu-wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PYTHON=${PYTHON:-python3}
ABI=cp${GPU_PYTHON/./}
MAX_MIB=60

PLATFORMS=()
# The image is Ubuntu 24.04 (glibc 2.39): any manylinux wheel up to 2.39 runs there.
for platform in manylinux_2_39 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${platform}_x86_64")
done
rm -rf "$DIR"
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    "${PLATFORMS[@]}" -d "$DIR" -r scripts/gpu_wheels.txt

"$PYTHON" - "$DIR" "$GPU_PYTHON" "$MAX_MIB" <<'PY'
"""Every wheel in DIR installable by CPython GPU_PYTHON on x86-64 glibc 2.39, one per pinned
line of scripts/gpu_wheels.txt, at most MAX_MIB in all."""
import sys
from pathlib import Path

try:
    from packaging import tags, utils
except ImportError:  # a bare python3: pip carries its own copy
    from pip._vendor.packaging import tags, utils

folder, python, max_mib = Path(sys.argv[1]), tuple(map(int, sys.argv[2].split("."))), float(sys.argv[3])
platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]
platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
interpreter = f"cp{python[0]}{python[1]}"
supported = {*tags.cpython_tags(python, platforms=platforms), *tags.compatible_tags(python, interpreter, platforms)}
wheels = sorted(folder.glob("*.whl"))
wrong = [w.name for w in wheels if not utils.parse_wheel_filename(w.name)[3] & supported]
pinned = [line for line in Path("scripts/gpu_wheels.txt").read_text().splitlines() if line and not line.startswith("#")]
mib = sum(w.stat().st_size for w in wheels) / 2**20
problems = [f"not installable by CPython {sys.argv[2]} on x86-64: {name}" for name in wrong]
problems += [f"{len(wheels)} wheels for {len(pinned)} pinned packages"] if len(wheels) != len(pinned) else []
problems += [f"{mib:.1f} MiB, more than {max_mib:.0f}"] if mib > max_mib else []
for problem in problems:
    print(f"gpu_wheels.sh: {problem}", file=sys.stderr)
print(f"{folder}: {len(wheels)} wheels for CPython {sys.argv[2]}, {mib:.1f} MiB")
sys.exit(1 if problems else 0)
PY
