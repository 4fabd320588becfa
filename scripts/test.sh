#!/usr/bin/env bash
# Install (scripts/install.sh tests) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh tests
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
# Two workers (pytest-xdist), one test file each at a time: files share their module fixtures, and on
# 2 cores the suite takes ~20 instead of ~26 minutes (much of it is process start-up and launches).
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
