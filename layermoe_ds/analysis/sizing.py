"""What a rank must hold, from parameter counts (of the model itself, built on the meta device): the memory floor
of stage 1 and stage 2, the size of an upcycled model and of a checkpoint. `bench/scale_bench.py` measures runs
against these floors, and docs/sizing.md's table is printed by the same functions
(`python bench/scale_bench.py --sizing`).

Not counted: activations (they scale with micro-batch × sequence; activation checkpointing cuts them), the CUDA
context or the Python process itself, and allocator slack. The benchmark reports the process baseline beside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """A dense model's parameters, counted on the model itself (built on the meta device: no memory, any family)."""

    dense: int  # every parameter, a tied head once
    hidden: int  # the width of a router's input
    ffn: tuple[int, ...]  # per decoder layer, its FFN's parameters: what each new expert of that layer copies


def param_counts(config) -> ParamCounts:
    """Count a dense Hugging Face config's model, its family's layout and FFN whatever they are (GeGLU, a fused
    gate_up_proj, biases, extra norms): the classes and layout LayerMoE expands it by."""
    from layermoe_ds.modeling.families import expandable
    from layermoe_ds.modeling.remote.modeling_layermoe import attribute_path

    model_cls, layout = expandable(config)
    with torch.device("meta"):
        model = model_cls(config)
    layers = attribute_path(model, layout.decoder_layers)
    ffn = tuple(sum(p.numel() for p in getattr(layer, layout.ffn_module).parameters()) for layer in layers)
    return ParamCounts(sum(p.numel() for p in model.parameters()), config.get_text_config().hidden_size, ffn)


@dataclass(frozen=True)
class Shape:
    """A published model's shape, as the arguments of its Hugging Face config; counted through `param_counts`."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    model_type: str = "llama"

    def hf_kwargs(self) -> dict:
        """The shape as Hugging Face config arguments (LlamaConfig, Qwen2Config, MistralConfig, …)."""
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
        )

    def counts(self) -> ParamCounts:
        return _shape_counts(self)


@cache
def _shape_counts(shape: Shape) -> ParamCounts:
    from transformers import AutoConfig

    return param_counts(AutoConfig.for_model(shape.model_type, **shape.hf_kwargs()))


# The shapes in docs/sizing.md's table (their published configs).
SHAPES = {
    "qwen2-0.5b": Shape(24, 896, 4864, 14, 2, 151_936, True, "qwen2"),
    "qwen2-1.5b": Shape(28, 1536, 8960, 12, 2, 151_936, True, "qwen2"),
    "llama-3.2-3b": Shape(28, 3072, 8192, 24, 8, 128_256, True),
    "mistral-7b": Shape(32, 4096, 14336, 32, 8, 32_000, False, "mistral"),
}


def moe_params(
    counts: ParamCounts, experts_per_layer: Sequence[int], classifier_layers: Sequence[int] = (), groups: int = 2
):
    """(total parameters of the upcycled model, new-expert parameters, router + classifier parameters)."""
    new = sum((n - 1) * ffn for n, ffn in zip(experts_per_layer, counts.ffn, strict=True))
    gates = sum(counts.hidden * n for n in experts_per_layer if n > 1)
    gates += sum(counts.hidden * groups for i in classifier_layers if experts_per_layer[i] > 1)
    return counts.dense + new + gates, new, gates


@dataclass(frozen=True)
class Floor:
    frozen: int  # bytes of frozen tensors on this rank
    trainable: int  # weights + gradients of this rank's trainable tensors
    optimizer: int  # Adam moments (+ fp32 master copy) on this rank, after ZeRO sharding
    total: int


def stage1_floor(
    counts: ParamCounts,
    experts_per_layer: Sequence[int],
    world: int,
    ep_size: int | None = None,
    dtype: str = "bfloat16",
    zero: int = 2,
) -> Floor:
    """Per-rank bytes in stage 1: frozen tensors in `dtype`; this rank's new experts (new experts ÷ ep_size) and the
    replicated routers with their gradients in `dtype`; Adam's two fp32 moments plus an fp32 master copy (ZeRO keeps
    one in fp32 training too) sharded over each tensor's data-parallel group (world ÷ ep_size for experts, world for
    routers) when ZeRO is on. `ep_size` None: the largest that divides every layer's new experts and the world."""
    width = DTYPE_BYTES[dtype]
    total, new, gates = moe_params(counts, experts_per_layer)
    frozen_params = total - new - gates
    state = 8 + (4 if zero or dtype != "float32" else 0)  # Adam's moments, + the fp32 master copy ZeRO/bf16 keep
    local_new, optimizer = 0, 0
    for n, ffn in zip(experts_per_layer, counts.ffn, strict=True):
        if n > 1:
            ep = ep_size or math.gcd(n - 1, world)  # the training path's `auto` (moe_layer.choose_ep_size)
            local = (n - 1) // ep * ffn
            local_new += local
            optimizer += local * state // (world // ep if zero else 1)  # sharded over the expert-data-parallel group
    optimizer += gates * state // (world if zero else 1)
    trainable = (local_new + gates) * width * 2
    return Floor(frozen_params * width, trainable, optimizer, frozen_params * width + trainable + optimizer)


def stage2_floor(
    counts: ParamCounts,
    experts_per_layer: Sequence[int],
    classifier_layers: Sequence[int],
    world: int,
    dtype: str = "bfloat16",
) -> Floor:
    """Per-rank bytes in stage 2: everything frozen in `dtype` (the new experts expert-parallel as in stage 1: this
    rank's share), the routers and classifiers in fp32 with their gradients and Adam's moments (ZeRO 0)."""
    width = DTYPE_BYTES[dtype]
    total, new, gates = moe_params(counts, experts_per_layer, classifier_layers)
    pairs = zip(experts_per_layer, counts.ffn, strict=True)
    local_new = sum((n - 1) // math.gcd(n - 1, world) * ffn for n, ffn in pairs if n > 1)
    frozen = (total - new - gates + local_new) * width
    trainable = gates * 4 * 2
    optimizer = gates * 8
    return Floor(frozen, trainable, optimizer, frozen + trainable + optimizer)


def upcycled_bytes(
    counts: ParamCounts, experts_per_layer: Sequence[int], classifier_layers=(), dtype: str = "bfloat16"
) -> int:
    total, _, _ = moe_params(counts, experts_per_layer, classifier_layers)
    return total * DTYPE_BYTES[dtype]
