"""The sizing formulas (analysis/sizing.py) against real models' parameter counts, and the floors' arithmetic."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from layermoe_ds.analysis.sizing import SHAPES, Shape, moe_params, stage1_floor, stage2_floor
from layermoe_ds.modeling.upcycle import upcycle

SMALL = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Shape(3, 64, 96, 4, 2, 101, True, True)),
    "llama": (LlamaConfig, LlamaForCausalLM, Shape(3, 64, 96, 4, 2, 101, True)),
    "mistral": (MistralConfig, MistralForCausalLM, Shape(3, 64, 96, 4, 2, 101, False)),
}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_parameter_counts_match_real_models(arch):
    config_cls, model_cls, shape = SMALL[arch]
    config = config_cls(**shape.hf_kwargs())
    with torch.device("meta"):
        dense = model_cls(config)
    assert shape.dense_params == sum(p.numel() for p in dense.parameters())
    counts, classifiers = [3, 1, 2], [0, 1]
    moe = upcycle(model_cls(config), {"experts_per_layer": counts, "classifier_layers": classifiers})
    total, new, gates = moe_params(shape, counts, classifiers)
    assert total == sum(p.numel() for p in moe.parameters())
    assert new == 3 * shape.ffn_params and gates == 64 * (3 + 2) + 64 * 2


def test_published_shapes_have_their_published_sizes():
    # Qwen2-0.5B: 494M; Qwen2-1.5B: 1.54B; Llama-3.2-3B: 3.21B; Mistral-7B: 7.24B (their model cards).
    sizes = {name: shape.dense_params / 1e9 for name, shape in SHAPES.items()}
    assert sizes["qwen2-0.5b"] == pytest.approx(0.494, abs=0.002)
    assert sizes["qwen2-1.5b"] == pytest.approx(1.54, abs=0.01)
    assert sizes["llama-3.2-3b"] == pytest.approx(3.21, abs=0.01)
    assert sizes["mistral-7b"] == pytest.approx(7.24, abs=0.01)


def test_floors_count_what_a_rank_holds():
    shape = SHAPES["qwen2-0.5b"]
    counts = [1] + [2] * 10 + [3] * 13
    one = stage1_floor(shape, counts, world=2, dtype="float32")
    total, new, gates = moe_params(shape, counts)
    # Layers with 1 new expert keep it on both ranks; layers with 2 split them (ep 2): 10 + 13 local experts.
    local = 23 * shape.ffn_params
    assert one.frozen == (total - new - gates) * 4
    assert one.trainable == (local + gates) * 8
    assert one.total == one.frozen + one.trainable + one.optimizer
    two = stage2_floor(shape, counts, [23], world=2, dtype="bfloat16")
    assert two.frozen < one.frozen and two.optimizer < 1e6  # bf16 frozen; only the gates' Adam moments
