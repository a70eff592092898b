"""Configuration of a LayerMoE model: the dense architecture's config plus per-layer expert layout."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config

CLASSIFIER_MODES = ("per-token", "prefix-mean")


def _validate_layermoe(config) -> None:
    layers = config.num_hidden_layers
    counts = list(config.experts_per_layer or [1] * layers)
    if len(counts) != layers:
        raise ValueError(f"experts_per_layer: {len(counts)} entries for {layers} layers")
    if any(not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"experts_per_layer: {counts} must be integers >= 1")
    groups = config.expert_groups or [[0] + [1] * (n - 1) for n in counts]
    if [len(g) for g in groups] != counts:
        raise ValueError(f"expert_groups: sizes {[len(g) for g in groups]} do not match experts_per_layer {counts}")
    for i, g in enumerate(groups):
        if g[0] != 0 or g != sorted(g) or g[-1] >= config.num_groups:
            raise ValueError(
                f"expert_groups[{i}]: {g} must start with 0 (the original FFN), never decrease and stay "
                f"below num_groups {config.num_groups}"
            )
    bad = [i for i in config.classifier_layers or [] if not 0 <= i < layers or counts[i] == 1]
    if bad:
        raise ValueError(f"classifier_layers: {bad} are outside 0..{layers - 1} or dense layers")
    if config.classifier_mode not in CLASSIFIER_MODES:
        raise ValueError(f"classifier_mode: {config.classifier_mode!r} is not one of {CLASSIFIER_MODES}")
    if config.moe_top_k < 1:
        raise ValueError(f"moe_top_k: {config.moe_top_k} must be >= 1")
    config.experts_per_layer, config.expert_groups = counts, [list(g) for g in groups]
    config.classifier_layers = sorted(config.classifier_layers or [])


@strict
class LayerMoEFields(PreTrainedConfig):
    """The LayerMoE fields, mixed in before each dense architecture's config."""

    experts_per_layer: list | None = None  # N_i, total experts of layer i including the original FFN (expert 0)
    expert_groups: list | None = None  # per layer: the language group that added each expert (expert 0: group 0)
    num_groups: int = 2  # language groups known so far: old + one per expansion
    classifier_layers: list | None = None
    classifier_mode: str = "per-token"
    classifier_routing: bool = True  # class "old" → expert 0 alone (stage 2 and inference); off in stage 1
    moe_top_k: int = 2
    allocation: dict | None = None  # the allocation.json history this model was upcycled and grown from

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_layermoe(self)


@strict
class LayerMoELlamaConfig(LayerMoEFields, LlamaConfig):
    model_type = "layermoe_llama"


@strict
class LayerMoEQwen2Config(LayerMoEFields, Qwen2Config):
    model_type = "layermoe_qwen2"


@strict
class LayerMoEMistralConfig(LayerMoEFields, MistralConfig):
    model_type = "layermoe_mistral"
