"""The testbed's dense base model: its shape and `layermoe pretrain`'s settings (validated like every config)."""

from __future__ import annotations

import dataclasses

from layermoe_ds.config import StrEnum, at_least, check_schedule, coerce_choices, setting
from layermoe_ds.errors import InputError


class Arch(StrEnum):
    LLAMA = "llama"
    QWEN2 = "qwen2"


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Shape of the tiny dense model `layermoe pretrain` trains from scratch."""

    arch: Arch = setting(Arch.LLAMA, "architecture of the dense model")
    num_layers: int = setting(4, "decoder layers", flag="layers")
    hidden_size: int = setting(128, "hidden size", flag="hidden")
    num_heads: int = setting(4, "attention heads", flag="heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)", flag="kv-heads")
    intermediate_size: int = setting(352, "FFN intermediate size", flag="ffn")
    max_position: int = setting(512, "longest sequence the position encoding is sized for")
    tie_embeddings: bool = setting(True, "share the input embedding with the LM head")

    def __post_init__(self) -> None:
        coerce_choices(self, "model")
        at_least(self, "model", 1, "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
        at_least(self, "model", 1, "max_position")
        if self.hidden_size % self.num_heads:
            raise InputError(f"model.hidden_size: {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"model.num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """`layermoe pretrain`: train the dense base model on the old languages only."""

    model: BaseModelConfig = setting(default_factory=BaseModelConfig)
    langs: tuple[str, ...] = setting(("en", "de"), "the old languages the base model learns")
    # Languages the base model sees only a little of, as real LLMs have seen a little of most languages (the paper's
    # new languages are low-resource for its base models, not absent); their share of the training blocks.
    low_resource_langs: tuple[str, ...] = setting(
        (), "languages the model sees only a little of (a real LLM has seen a little of most)"
    )
    low_resource_share: float = setting(0.0, "their share of the training blocks, e.g. 0.05")
    steps: int = setting(400, "optimizer steps")
    batch_size: int = setting(16, "sequences per step")
    seq_len: int = setting(128, "tokens per sequence")
    lr: float = setting(3e-3, "peak learning rate (warm-up, then cosine)")
    warmup_steps: int = setting(40, "linear warm-up steps")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    seed: int = setting(0, "initialisation and data order")
    save_every: int = setting(100, "checkpoint every N steps (a killed run resumes from the newest)")

    def __post_init__(self) -> None:
        coerce_choices(self, "pretrain")
        if not self.langs:
            raise InputError("pretrain.langs: empty; give the old languages, e.g. en,de")
        overlap = sorted(set(self.langs) & set(self.low_resource_langs))
        if overlap:
            raise InputError(f"pretrain.low_resource_langs: {overlap} are also in pretrain.langs")
        if not 0.0 <= self.low_resource_share < 0.5:
            raise InputError(f"pretrain.low_resource_share: {self.low_resource_share} must be in [0, 0.5)")
        if bool(self.low_resource_langs) != (self.low_resource_share > 0):
            raise InputError(
                "pretrain.low_resource_share: set it > 0 exactly when low_resource_langs is given "
                f"(share {self.low_resource_share}, langs {list(self.low_resource_langs)})"
            )
        at_least(self, "pretrain", 1, "steps", "batch_size", "seq_len", "save_every")
        for name in ("weight_decay", "seed"):
            if not getattr(self, name) >= 0:
                raise InputError(f"pretrain.{name}: {getattr(self, name)} must be >= 0")
        if self.seq_len > self.model.max_position:
            raise InputError(f"pretrain.seq_len: {self.seq_len} exceeds model.max_position {self.model.max_position}")
        check_schedule(self, "pretrain")
