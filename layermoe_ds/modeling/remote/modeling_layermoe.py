"""LayerMoE causal LMs: a dense HF architecture whose layer-i FFN is a `LayerMoEBlock` with N_i experts.

Layers with N_i = 1 keep the dense FFN module untouched. Everything outside the FFNs (embeddings, attention, norms,
LM head, generation) is the dense architecture's own code, so names and behaviour match the dense model. One class
per dense model class, derived on first use (`layermoe_model_class`, or by name through the module's `__getattr__`:
`LayerMoEQwen3ForCausalLM` from transformers' `Qwen3ForCausalLM`). Where the decoder layers and their FFN live is in
the config (`decoder_layers`, `ffn_module`), written by layermoe_ds when it expands a model.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re

import transformers
from torch import nn
from transformers import PreTrainedModel

from .configuration_layermoe import layermoe_config_class
from .layermoe_block import LayerMoEBlock, LayerMoEGate
from .prefix_state import contexts_for, keep_sums, reorder_sums


def build_block(dense_ffn: nn.Module, config, layer: int) -> LayerMoEBlock:
    """A block for layer `layer` around `dense_ffn` (expert 0); new experts start as copies of it."""
    groups = config.expert_groups[layer]
    num_classes = config.num_groups if layer in config.classifier_layers else 0
    gate = LayerMoEGate(groups, config.moe_top_k, config.classifier_mode)
    experts = [dense_ffn, *(copy.deepcopy(dense_ffn) for _ in range(len(groups) - 1))]
    block = LayerMoEBlock(experts, gate, config.get_text_config().hidden_size, num_classes)
    block.classifier_routing = config.classifier_routing
    return block


def attribute_path(root, path: str):
    """`root.a.b.c` for `path` "a.b.c"."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


class LayerMoEMixin:
    """Shared by every LayerMoE class: build the blocks, list them, switch routing."""

    def decoder_layers(self) -> nn.ModuleList:
        return attribute_path(self, self.config.decoder_layers)

    def _install_blocks(self) -> None:
        ffn = self.config.ffn_module
        for i, layer in enumerate(self.decoder_layers()):
            if self.config.experts_per_layer[i] > 1:
                setattr(layer, ffn, build_block(getattr(layer, ffn), self.config, i))

    def moe_blocks(self) -> dict[int, LayerMoEBlock]:
        """Layer index → block, for the MoE layers only."""
        ffn = self.config.ffn_module
        layers = self.decoder_layers()
        return {
            i: getattr(layer, ffn) for i, layer in enumerate(layers) if isinstance(getattr(layer, ffn), LayerMoEBlock)
        }

    def set_force_base(self, enabled: bool) -> None:
        """Send every token to expert 0 alone in every layer: the output is the original dense model's."""
        for block in self.moe_blocks().values():
            block.force_base = enabled

    def set_max_group(self, group: int | None) -> None:
        """Use only experts (and classifier classes) of language groups ≤ `group`: the model before later growth."""
        for block in self.moe_blocks().values():
            block.max_group = group

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) when asked for
        head = model.get_output_embeddings()
        if head is not None and head.weight.is_meta:  # transformers 5.3 leaves a remote-code model's tied head unset
            model.tie_weights()
        return loaded

    def prefix_mean_layers(self) -> list[int]:
        """The layers whose classifier reads the running mean of the prefix (`classifier_mode: prefix-mean`)."""
        return [
            layer
            for layer, block in self.moe_blocks().items()
            if block.classifier is not None and block.gate.classifier_mode == "prefix-mean"
        ]

    def _reorder_cache(self, past_key_values, beam_idx):
        """Beam search: the KV cache and the prefix-mean sums kept beside it follow the beams."""
        past_key_values.reorder_cache(beam_idx)
        reorder_sums(past_key_values, beam_idx)
        return past_key_values

    def set_classifier_routing(self, enabled: bool) -> None:
        """On: class "old" → expert 0 alone (stage 2, inference). Off: router top-k for every token (stage 1)."""
        self.config.classifier_routing = enabled
        for block in self.moe_blocks().values():
            block.classifier_routing = enabled


def _forward_keeping_prefix_sums(dense_forward):
    """The dense class's forward (its signature too, which generate() reads), with each prefix-mean classifier
    given the running sums of the positions in the KV cache and the padding mask (prefix_state.py)."""
    signature = inspect.signature(dense_forward)

    @functools.wraps(dense_forward)
    def forward(self, *args, **kwargs):
        layers = self.prefix_mean_layers()
        if not layers:
            return dense_forward(self, *args, **kwargs)
        given = signature.bind_partial(self, *args, **kwargs).arguments
        given |= given.pop("kwargs", {})
        inputs = given.get("input_ids")
        inputs = given.get("inputs_embeds") if inputs is None else inputs
        contexts = contexts_for(layers, *inputs.shape[:2], given.get("attention_mask"), _cache_of(given))
        blocks = self.moe_blocks()
        for layer, context in contexts.items():
            blocks[layer].gate.prefix_context = context
        try:
            outputs = dense_forward(self, *args, **kwargs)
        finally:
            for layer in contexts:
                blocks[layer].gate.prefix_context = None
        keep_sums(_cache_of(outputs if isinstance(outputs, dict) else {}), contexts)
        return outputs

    return forward


def _cache_of(values: dict):
    """The KV cache among a forward's arguments or outputs: `cache` since transformers 5.25, `past_key_values`
    before."""
    cache = values.get("cache")
    return values.get("past_key_values") if cache is None else cache


_CLASSES: dict[str, type] = {}


def layermoe_model_class(dense_cls: type) -> type:
    """`LayerMoE<Dense>` for a dense model class (its config class: `LayerMoE<Dense config>`)."""
    name = f"LayerMoE{dense_cls.__name__}"
    if name not in _CLASSES:

        def __init__(self, config):
            dense_cls.__init__(self, config)
            self._install_blocks()
            self.post_init()

        namespace = {"config_class": layermoe_config_class(dense_cls.config_class), "__init__": __init__}
        namespace["forward"] = _forward_keeping_prefix_sums(dense_cls.forward)
        namespace |= {"__module__": __name__, "__qualname__": name}
        _CLASSES[name] = type(name, (LayerMoEMixin, dense_cls), namespace)
    return _CLASSES[name]


def __getattr__(name: str):
    """`LayerMoE<X>` for any model class `<X>` of the installed transformers (how an export's `auto_map` finds its
    class in this file)."""
    match = re.fullmatch(r"LayerMoE(\w+)", name)
    dense = getattr(transformers, match[1], None) if match else None
    if not (isinstance(dense, type) and issubclass(dense, PreTrainedModel) and dense.config_class is not None):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return layermoe_model_class(dense)
