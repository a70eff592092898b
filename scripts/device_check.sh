#!/usr/bin/env bash
# The GPU checks in one script, for the few minutes a lent GPU gives: each step has its own time limit, runs whatever
# the step before it did, and leaves its log and JSON under OUT; OUT/summary.txt has a line a step (exit status,
# seconds). The steps:
#   env        the device, torch and DeepSpeed versions
#   probe      the LayerMoE block in bf16 on the GPU against fp32 on the CPU (`pytest -m gpu`)
#   block      bench/moe_block_bench.py --device cuda: dispatch at hidden 2048 / FFN 5504, 4K and 16K tokens
#   train      bench/gpu_bench.py: stage-1 throughput, MFU and memory of a 1.8B-class Qwen2 against dense
#   generate   bench/generate_bench.py --device cuda: decoding against the dense model, beside the roofline
#   pipeline   scripts/device_pipeline.py: profile, allocate, upcycle, stages 1 and 2, evaluate, export --checkpoint,
#              remote-code load and cached = uncached generation, at the real base's shape (random weights)
#
#   scripts/device_check.sh [--smoke] [OUT]       (default OUT: device-check)
#
# --smoke is the CPU rehearsal (tests/test_device_check.py runs it): the same steps at test size, so that a GPU's
# minutes go to measuring. What the steps read (env, with defaults): DATA (data/: the embedded corpus, ~23 MB),
# TOKENIZER (artifacts/tokenizer: trained from DATA when missing), SHAPE_FROM (artifacts/smollm2 without its weights:
# config.json and tokenizer files). On the device tool: carry data, artifacts/tokenizer and the smollm2 config and
# tokenizer (the real base's 538 MB of weights cannot travel), e.g. `carry: [".venv", "data", "artifacts/tokenizer",
# "artifacts/smollm2-shape"]` with SHAPE_FROM=artifacts/smollm2-shape.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

SMOKE=0
if [[ ${1:-} == --smoke ]]; then
    SMOKE=1
    shift
fi
OUT=${1:-device-check}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
TOKENIZER=${TOKENIZER:-artifacts/tokenizer}
SHAPE_FROM=${SHAPE_FROM:-artifacts/smollm2}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
failed=0

# step NAME LIMIT_SECONDS COMMAND...: run it under its limit, its output in OUT/NAME.log, a summary line.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local line="$name rc=$rc $((SECONDS - start)) s"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        line="$line (over its ${limit} s limit)"
    fi
    echo "$line" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
    if [[ $rc -ne 0 ]]; then
        failed=1
    fi
}

if [[ $SMOKE -eq 1 ]]; then
    export DS_ACCELERATOR=cpu
    step env 60 "$PY" -c "import torch, deepspeed; print('cpu', torch.__version__, deepspeed.__version__)"
    step probe 120 "$PY" -m pytest -q -m gpu tests/test_moe_block.py -p no:cacheprovider
    step block 180 "$PY" bench/moe_block_bench.py --quick --out "$OUT/moe_block_bench.json"
    step train 300 "$PY" bench/gpu_bench.py --smoke --data "$DATA" --tokenizer-from "$TOKENIZER" \
        --out "$OUT/gpu_bench.json"
    step generate 180 "$PY" bench/generate_bench.py --device cpu --shape 64,128,4 --new-tokens 4 --repeats 1 \
        --out "$OUT/generate_bench.json"
    step pipeline 600 "$PY" scripts/device_pipeline.py --smoke --shape-from "$SHAPE_FROM" --data "$DATA" \
        --out "$OUT/pipeline"
else
    step env 60 bash -c "nvidia-smi; $PY -c \"import torch, deepspeed; print(torch.__version__, torch.version.cuda, \
deepspeed.__version__, torch.cuda.get_device_name())\""
    if [[ ! -f $TOKENIZER/tokenizer.json ]]; then
        step tokenizer 300 .venv/bin/layermoe tokenizer train --data "$DATA" --out "$TOKENIZER"
    fi
    step probe 120 "$PY" -m pytest -q -m gpu tests/test_moe_block.py -p no:cacheprovider
    step block 150 "$PY" bench/moe_block_bench.py --device cuda --out "$OUT/moe_block_bench_gpu.json"
    step train 240 "$PY" bench/gpu_bench.py --gpus 1 --data "$DATA" --tokenizer-from "$TOKENIZER" \
        --out "$OUT/gpu_bench.json"
    step generate 120 "$PY" bench/generate_bench.py --device cuda --out "$OUT/generate_bench_gpu.json"
    step pipeline 300 "$PY" scripts/device_pipeline.py --shape-from "$SHAPE_FROM" --data "$DATA" --steps 60 \
        --out "$OUT/pipeline"
fi
echo "summary ($OUT/summary.txt):"
cat "$OUT/summary.txt"
exit $failed
