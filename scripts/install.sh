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
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
