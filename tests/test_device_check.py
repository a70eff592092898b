"""The GPU checks' script, rehearsed on CPU (`scripts/device_check.sh --smoke`): every step at test size, so that a
lent GPU's few minutes go to measuring, not to mending the script. Minutes here: `make test-real` runs it."""

import json
import os
import subprocess

import pytest
import transformers

from tests.helpers import ROOT

pytestmark = pytest.mark.rehearsal


def test_the_device_script_runs_every_step_on_cpu(corpus_dir, tokenizer_dir, tmp_path):
    shape = tmp_path / "shape"  # the real base's stand-in: a Llama config and a tokenizer, no weights
    transformers.LlamaConfig(vocab_size=1000, tie_word_embeddings=True).save_pretrained(shape)
    for file in tokenizer_dir.iterdir():
        (shape / file.name).write_bytes(file.read_bytes())
    out = tmp_path / "check"
    env = {**os.environ, "DATA": str(corpus_dir), "TOKENIZER": str(tokenizer_dir), "SHAPE_FROM": str(shape),
           "PY": str(ROOT / ".venv" / "bin" / "python"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([str(ROOT / "scripts" / "device_check.sh"), "--smoke", str(out)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=1500)  # fmt: skip
    summary = (out / "summary.txt").read_text().splitlines()
    assert result.returncode == 0, result.stdout[-3000:]
    assert [line.split()[0] for line in summary] == ["env", "probe", "block", "train", "generate", "pipeline"]
    assert all(" rc=0 " in line for line in summary), summary
    pipeline = json.loads((out / "pipeline" / "pipeline.json").read_text())
    assert pipeline["device"] == "cpu" and pipeline["generation"]["cached_equals_uncached"]
    assert pipeline["generation"]["class"].startswith("LayerMoE")
    assert len(pipeline["new_avg_bpb"]) == 3  # the dense base and both systems, evaluated
    for name in ("moe_block_bench.json", "gpu_bench.json", "generate_bench.json"):
        assert json.loads((out / name).read_text())
