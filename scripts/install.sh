#!/usr/bin/env bash
# Create/update the project's virtual environment: torch first (one place for its version), then layermoe_ds.
# Used by the Makefile, CI and the Dockerfile. Usage: scripts/install.sh [VENV_DIR] [EXTRAS]
set -euo pipefail
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${1:-.venv}"
EXTRAS="${2:-dev}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch before everything else, so that deepspeed/transformers see it and pull no other build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if env | grep -q '^DS_BUILD_'; then
    # Prebuilding DeepSpeed ops (the Dockerfile's DS_BUILD_FUSED_ADAM=1) needs torch visible to DeepSpeed's setup:
    # no build isolation. The version is the tested one, constraints.txt's.
    DEEPSPEED_PIN="$(grep -Eo '^deepspeed==[0-9.]+' constraints.txt)"
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation "$DEEPSPEED_PIN"
fi
# The tested versions of everything (constraints.txt); setup.cfg's ranges are what a user's own environment may hold.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[${EXTRAS}]"
