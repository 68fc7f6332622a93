#!/usr/bin/env bash
# The GPU run rehearsed on this CPU machine (CI runs it; docs/gpu.md, "The rehearsal"):
#   1. the wheels the GPU machine will get (build/gpu-wheels, CPython 3.12), checked by
#      scripts/gpu_wheels.sh: installable there, at most 60 MiB;
#   2. a fresh virtual environment holding only the GPU image's packages at its versions;
#   3. the same pinned wheels for this Python, installed and run by scripts/gpu_run.sh, the
#      command the GPU machine runs, with --small;
#   4. every part of the result measured, with the image's versions and the pinned ones.
#   scripts/gpu_rehearsal.sh [DIR]     # default build/gpu-rehearsal (git-ignored)
# Python 3.11, not the image's 3.12: the only CPU build of torch within reach (local disk) is
# for 3.11, PyPI's are multi-GB CUDA builds. So the carried wheels' binary ones are fetched
# twice from one pinned list, checked for 3.12 and run for 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-build/gpu-rehearsal}
PYTHON=${PYTHON:-python3}
# The GPU image's packages (docs/gpu.md, "The GPU machine"). Here: torch is the CPU build of
# this machine's version, not 2.11.0+cu130; numpy 2.5.2 has no wheel for 3.11 (2.4.6 here);
# triton is left out (no GPU); the unversioned ones are whatever PyPI has.
TORCH=torch==2.13.0
IMAGE=(
    transformers==5.17.0 huggingface_hub==1.33.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2
    torchmetrics==1.9.0 numpy==2.4.6
    requests urllib3 python-dateutil six werkzeug pyyaml rich click httpx pillow psutil prometheus-client
    scikit-image lazy-loader sentencepiece pytest
)

scripts/gpu_wheels.sh build/gpu-wheels
GPU_PYTHON=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') PYTHON="$PYTHON" \
    scripts/gpu_wheels.sh "$DIR/wheels"

started=$SECONDS
rm -rf "$DIR/venv" "$DIR/out"
"$PYTHON" -m venv "$DIR/venv"
VENV_PYTHON=$DIR/venv/bin/python
"$VENV_PYTHON" -m pip install -q --disable-pip-version-check "$TORCH"
"$VENV_PYTHON" -m pip install -q --disable-pip-version-check "$TORCH" "${IMAGE[@]}"
# Python 3.12's venv has no setuptools, and nothing says the image has: nothing may need it.
"$VENV_PYTHON" -m pip uninstall -q -y setuptools
image_s=$((SECONDS - started))

started=$SECONDS
PYTHON=$VENV_PYTHON GPU_WHEELS=$DIR/wheels GPU_SITE=$DIR/site scripts/gpu_run.sh "$DIR/out" --small
run_s=$((SECONDS - started))

"$VENV_PYTHON" - "$DIR/out/gpu.json" "$image_s" "$run_s" "$TORCH" "${IMAGE[@]}" <<'PY'
"""Every part measured, with the image's versions and the carried ones."""
import json
import sys
from pathlib import Path

path, image_s, run_s, *pins = sys.argv[1:]
result = json.loads(Path(path).read_text())
wanted = dict(line.split("==") for line in Path("scripts/gpu_wheels.txt").read_text().splitlines() if "==" in line)
wanted.update(pin.split("==") for pin in pins if "==" in pin)
# The local part of a version (torch's "+cpu") names the build, not the version.
found = {name: found.split("+")[0] for name, found in result["versions"].items() if found}
problems = [f"{name}: {part}" for name, part in result["parts"].items() if part["status"] != "ok"]
problems += [f"{name} {found[name]}, not {wanted[name]}" for name in found if name in wanted and found[name] != wanted[name]]
if "error" in result:
    problems.append(result["error"])
for problem in problems:
    print(f"gpu_rehearsal.sh: {problem}", file=sys.stderr)
log = Path(path).with_name("gpu.log").read_text().splitlines()
imported_ms = next(line.split()[0] for line in log if "building the models" in line)
print(
    f"gpu_rehearsal.sh: image packages installed in {image_s} s; gpu_run.sh took {run_s} s "
    f"(imports done at {float(imported_ms) / 1000:.1f} s of the process, the run {result.get('elapsed_s')} s); "
    + ("every part measured" if not problems else f"{len(problems)} problems")
)
sys.exit(1 if problems else 0)
PY
