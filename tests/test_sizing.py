"""Sizing (analysis/sizing.py): parameter counts from the meta-built model against the upcycled model's own, for
families whose FFN and norms differ, and the floors' arithmetic."""

import pytest
import torch
import transformers

from layermoe_ds.analysis.sizing import SHAPES, moe_params, param_counts, stage1_floor, stage2_floor
from layermoe_ds.modeling.upcycle import upcycle
from tests.test_families import TESTED, dense_config

# Unlike Llama: four norms a layer (gemma2), one fused gate_up_proj (phi3), a two-matrix FFN with biases
# (starcoder2), one norm a layer (cohere), the multimodal wrapper with its vision tower (gemma3).
FAMILIES = ["llama", "qwen2", "gemma2", "phi3", "starcoder2", "cohere", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_the_upcycled_model_of_any_family(family):
    assert family in TESTED
    config = dense_config(family, vocab=101, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    counts = param_counts(config)
    dense = transformers.AutoModelForCausalLM.from_config(config)
    assert counts.dense == sum(p.numel() for p in dense.parameters())
    experts, classifiers = [3, 1, 2, 1], [0, 1, 2]
    moe = upcycle(dense, {"experts_per_layer": experts, "classifier_layers": classifiers})
    total, new, gates = moe_params(counts, experts, classifiers)
    assert total == sum(p.numel() for p in moe.parameters())
    ffn = sum(p.numel() for p in moe.moe_blocks()[0].experts[0].parameters())
    assert counts.ffn == (ffn,) * 4 and new == 3 * ffn
    assert gates == 64 * (3 + 2) + 64 * 2 * 2  # routers of layers 0 and 2; classifiers there (layer 1 is dense)


def test_published_shapes_have_their_published_sizes():
    # Qwen2-0.5B: 494M; Qwen2-1.5B: 1.54B; Llama-3.2-3B: 3.21B; Mistral-7B: 7.24B (their model cards).
    sizes = {name: shape.counts().dense / 1e9 for name, shape in SHAPES.items()}
    assert sizes["qwen2-0.5b"] == pytest.approx(0.494, abs=0.002)
    assert sizes["qwen2-1.5b"] == pytest.approx(1.54, abs=0.01)
    assert sizes["llama-3.2-3b"] == pytest.approx(3.21, abs=0.01)
    assert sizes["mistral-7b"] == pytest.approx(7.24, abs=0.01)


def test_floors_count_what_a_rank_holds():
    counts = SHAPES["qwen2-0.5b"].counts()
    experts = [1] + [2] * 10 + [3] * 13
    one = stage1_floor(counts, experts, world=2, dtype="float32")
    total, new, gates = moe_params(counts, experts)
    # Layers with 1 new expert keep it on both ranks; layers with 2 split them (ep 2): 10 + 13 local experts.
    local = 23 * counts.ffn[0]
    assert counts.ffn[0] == 3 * 896 * 4864
    assert one.frozen == (total - new - gates) * 4
    assert one.trainable == (local + gates) * 8
    assert one.total == one.frozen + one.trainable + one.optimizer
    two = stage2_floor(counts, experts, [23], world=2, dtype="bfloat16")
    assert two.frozen < one.frozen and two.optimizer < 1e6  # bf16 frozen; only the gates' Adam moments
    assert torch.tensor(two.total).item() == two.frozen + two.trainable + two.optimizer
