#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu clone to a running demo or a green test suite:
#   scripts/dev.sh demo   # local stack + tiny models, writes demo-out/contact_sheet.png
#   scripts/dev.sh test   # the full test suite (what CI runs)
#   scripts/dev.sh lint   # ruff (format and check) and mypy (CI runs it before the tests)
# It creates .venv, installs the package with a CPU build of torch, and installs
# redis-server with apt when it is missing. Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The CPU build; on a GPU node install the CUDA build of your choice instead.
TORCH_SPEC=${REFINERY_TORCH_SPEC:-torch==2.13.0}

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (apt)"
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: left to resolve the [worker] range alone, pip picks a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[worker,dev]"

case "${1:-}" in
    demo) shift; exec .venv/bin/refinery demo "$@" ;;
    # Two files at a time (each file's tests in one process, its fixtures shared); a later
    # -n 0 runs them one by one.
    test) shift; exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@" ;;
    lint) .venv/bin/ruff format --check . && .venv/bin/ruff check . && exec .venv/bin/mypy ;;
    *) echo "usage: scripts/dev.sh demo|test|lint [args...]" >&2; exit 2 ;;
esac
