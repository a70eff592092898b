"""LayerMoE causal LMs: a dense HF architecture whose layer-i FFN is a `LayerMoEBlock` with N_i experts.

Layers with N_i = 1 keep the dense FFN module untouched. Everything outside the FFNs (embeddings, attention, norms,
LM head, generation) is the dense architecture's own code, so names and behaviour match the dense model.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_layermoe import LayerMoELlamaConfig, LayerMoEMistralConfig, LayerMoEQwen2Config
from .layermoe_block import LayerMoEBlock, LayerMoEGate, LocalNewExperts


def build_block(dense_ffn: nn.Module, config, layer: int) -> LayerMoEBlock:
    """A block for layer `layer` around `dense_ffn` (expert 0); new experts start as copies of it."""
    groups = config.expert_groups[layer]
    num_classes = config.num_groups if layer in config.classifier_layers else 0
    gate = LayerMoEGate(config.hidden_size, groups, config.moe_top_k, num_classes, config.classifier_mode)
    new_experts = LocalNewExperts([copy.deepcopy(dense_ffn) for _ in range(len(groups) - 1)])
    block = LayerMoEBlock(dense_ffn, new_experts, gate)
    block.classifier_routing = config.classifier_routing
    return block


class LayerMoEMixin:
    """Shared by the per-architecture classes: build the blocks, list them, switch routing."""

    def _install_blocks(self) -> None:
        for i, layer in enumerate(self.model.layers):
            if self.config.experts_per_layer[i] > 1:
                layer.mlp = build_block(layer.mlp, self.config, i)

    def moe_blocks(self) -> dict[int, LayerMoEBlock]:
        """Layer index → block, for the MoE layers only."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, LayerMoEBlock)}

    def set_force_base(self, enabled: bool) -> None:
        """Send every token to expert 0 alone in every layer: the output is the original dense model's."""
        for block in self.moe_blocks().values():
            block.force_base = enabled

    def set_max_group(self, group: int | None) -> None:
        """Use only experts (and classifier classes) of language groups ≤ `group`: the model before later growth."""
        for block in self.moe_blocks().values():
            block.max_group = group

    def set_classifier_routing(self, enabled: bool) -> None:
        """On: class "old" → expert 0 alone (stage 2, inference). Off: router top-k for every token (stage 1)."""
        self.config.classifier_routing = enabled
        for block in self.moe_blocks().values():
            block.classifier_routing = enabled


class LayerMoELlamaForCausalLM(LayerMoEMixin, LlamaForCausalLM):
    config_class = LayerMoELlamaConfig

    def __init__(self, config: LayerMoELlamaConfig):
        super().__init__(config)
        self._install_blocks()
        self.post_init()


class LayerMoEQwen2ForCausalLM(LayerMoEMixin, Qwen2ForCausalLM):
    config_class = LayerMoEQwen2Config

    def __init__(self, config: LayerMoEQwen2Config):
        super().__init__(config)
        self._install_blocks()
        self.post_init()


class LayerMoEMistralForCausalLM(LayerMoEMixin, MistralForCausalLM):
    config_class = LayerMoEMistralConfig

    def __init__(self, config: LayerMoEMistralConfig):
        super().__init__(config)
        self._install_blocks()
        self.post_init()
