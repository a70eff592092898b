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
# Without a GPU, DeepSpeed runs on CPU ranks, and each rank's first all-reduce JIT-builds DeepSpeed's shared-memory
# op (deepspeed_shm_comm, ~60 s, g++ and ninja) into this environment (layermoe_ds/ds/process.py::jit_build_env):
# built once here instead of inside the first run (or the first test). A machine with a GPU does not use it.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from layermoe_ds.ds.process import jit_build_env
import os
jit_build_env(os.environ)
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)" >/dev/null 2>&1 || echo "install.sh: DeepSpeed's CPU op was not built now; the first CPU run builds it" >&2
fi
