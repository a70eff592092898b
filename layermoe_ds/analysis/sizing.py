"""What a rank must hold, from parameter counts: the memory floor of stage 1 and stage 2, the size of an upcycled
model and of a checkpoint. `bench/scale_bench.py` measures runs against these floors, and the README's "sizing your
run" table is printed by the same functions (`python bench/scale_bench.py --sizing`).

Not counted: activations (they scale with micro-batch × sequence; activation checkpointing cuts them), the CUDA
context or the Python process itself, and allocator slack. The benchmark reports the process baseline beside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """A decoder-only LM's shape (Llama/Qwen2/Mistral family: SwiGLU FFN, grouped-query attention)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 has q/k/v biases

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

    @property
    def ffn_params(self) -> int:
        return 3 * self.hidden * self.ffn

    @property
    def attention_params(self) -> int:
        head = self.hidden // self.heads
        kv = self.kv_heads * head
        bias = (self.hidden + 2 * kv) if self.qkv_bias else 0
        return self.hidden * self.hidden * 2 + 2 * self.hidden * kv + bias

    @property
    def dense_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return embeddings + norms + self.layers * (self.attention_params + self.ffn_params)


# The shapes in the README's sizing table (their published configs).
SHAPES = {
    "qwen2-0.5b": Shape(24, 896, 4864, 14, 2, 151_936, True, True),
    "qwen2-1.5b": Shape(28, 1536, 8960, 12, 2, 151_936, True, True),
    "llama-3.2-3b": Shape(28, 3072, 8192, 24, 8, 128_256, True),
    "mistral-7b": Shape(32, 4096, 14336, 32, 8, 32_000, False),
}


def moe_params(shape: Shape, experts_per_layer: Sequence[int], classifier_layers: Sequence[int] = (), groups: int = 2):
    """(total parameters of the upcycled model, new-expert parameters, router + classifier parameters)."""
    new = sum(n - 1 for n in experts_per_layer) * shape.ffn_params
    gates = sum(shape.hidden * n for n in experts_per_layer if n > 1)
    gates += sum(shape.hidden * groups for i in classifier_layers if experts_per_layer[i] > 1)
    return shape.dense_params + new + gates, new, gates


@dataclass(frozen=True)
class Floor:
    frozen: int  # bytes of frozen tensors on this rank
    trainable: int  # weights + gradients of this rank's trainable tensors
    optimizer: int  # Adam moments (+ fp32 master copy) on this rank, after ZeRO sharding
    total: int


def stage1_floor(
    shape: Shape,
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
    total, new, gates = moe_params(shape, experts_per_layer)
    frozen_params = total - new - gates
    state = 8 + (4 if zero or dtype != "float32" else 0)  # Adam's moments, + the fp32 master copy ZeRO/bf16 keep
    local_new, optimizer = 0, 0
    for n in experts_per_layer:
        if n > 1:
            ep = ep_size or math.gcd(n - 1, world)  # the training path's `auto` (moe_layer.choose_ep_size)
            local = (n - 1) // ep * shape.ffn_params
            local_new += local
            optimizer += local * state // (world // ep if zero else 1)  # sharded over the expert-data-parallel group
    optimizer += gates * state // (world if zero else 1)
    trainable = (local_new + gates) * width * 2
    return Floor(frozen_params * width, trainable, optimizer, frozen_params * width + trainable + optimizer)


def stage2_floor(
    shape: Shape,
    experts_per_layer: Sequence[int],
    classifier_layers: Sequence[int],
    world: int,
    dtype: str = "bfloat16",
) -> Floor:
    """Per-rank bytes in stage 2: everything frozen in `dtype` (the new experts expert-parallel as in stage 1: this
    rank's share), the routers and classifiers in fp32 with their gradients and Adam's moments (ZeRO 0)."""
    width = DTYPE_BYTES[dtype]
    total, new, gates = moe_params(shape, experts_per_layer, classifier_layers)
    local_new = sum((n - 1) // math.gcd(n - 1, world) * shape.ffn_params for n in experts_per_layer if n > 1)
    frozen = (total - new - gates + local_new) * width
    trainable = gates * 4 * 2
    optimizer = gates * 8
    return Floor(frozen, trainable, optimizer, frozen + trainable + optimizer)


def upcycled_bytes(
    shape: Shape, experts_per_layer: Sequence[int], classifier_layers=(), dtype: str = "bfloat16"
) -> int:
    total, _, _ = moe_params(shape, experts_per_layer, classifier_layers)
    return total * DTYPE_BYTES[dtype]
