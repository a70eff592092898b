"""Which dense models can be expanded, and the one place that knows where a family keeps its parts.

Any Hugging Face causal LM whose decoder layers hold a feed-forward module can be expanded: its LayerMoE config and
model classes are derived from transformers' own (`modeling/remote/`), so no family is written out by hand. A
family's layout — the attribute path to its decoder layers, the name of the FFN in a layer — is the default
(`model.layers`, `mlp`) unless `LAYOUTS` says otherwise (Gemma-3's multimodal wrapper keeps its language model's
layers under `model.language_model`). A model that cannot be expanded is refused in one line naming what was found:
an encoder-decoder, a mixture of experts already, no causal LM class, no decoder layers or no FFN where the layout
says. `TESTED` lists the families the test suite runs end to end (the README's and docs/model.md's tables).

A dense directory's tensor names are the ones transformers' loader maps to module names (`dense_tensor_names`):
transformers saves some families in an older layout (Gemma-3: `language_model.model.layers…`), and LayerMoE reads
the dense weights by module name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from layermoe_ds.errors import InputError
from layermoe_ds.modeling.remote.modeling_layermoe import attribute_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    decoder_layers: str = "model.layers"  # from the causal LM to its nn.ModuleList of decoder layers
    ffn_module: str = "mlp"  # the decoder layer's feed-forward attribute

    @classmethod
    def of(cls, config) -> Layout:
        """The layout a LayerMoE config records."""
        return cls(config.decoder_layers, config.ffn_module)

    def ffn(self, layer: int) -> str:
        """The name of layer `layer`'s FFN module (or LayerMoE block), e.g. `model.layers.3.mlp`."""
        return f"{self.decoder_layers}.{layer}.{self.ffn_module}"

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer, the rest of the name) for a tensor inside a layer's FFN or block; None for any other tensor."""
        match = re.match(rf"{re.escape(self.decoder_layers)}\.(\d+)\.{re.escape(self.ffn_module)}\.(.+)$", name)
        return (int(match[1]), match[2]) if match else None


DEFAULT = Layout()
# dense model_type → its layout, where it is not the default
LAYOUTS: dict[str, Layout] = {"gemma3": Layout("model.language_model.layers")}

# Every family the tests expand, train, export, load and generate with (tests/test_families.py).
TESTED = (
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "smollm3",
    "cohere",
    "starcoder2",
)

# Config fields that mark a model as a mixture of experts already.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def layout_of(model_type: str) -> Layout:
    return LAYOUTS.get(model_type, DEFAULT)


def dense_model_class(model_type: str) -> type | None:
    """transformers' causal LM class for a dense model_type, None where this transformers has none."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def causal_lm_class(config) -> type:
    """The dense causal LM class of `config`, after the checks that need no weights (one-line errors)."""
    model_type = getattr(config, "model_type", "")
    what = f"architecture {model_type!r} ({type(config).__name__})"
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{what} is an encoder-decoder; LayerMoE expands decoder-only causal LMs")
    moe = [f"{name} = {getattr(config, name)}" for name in MOE_FIELDS if getattr(config, name, None)]
    if moe:
        raise InputError(f"{what} is a mixture of experts already ({', '.join(moe)}); LayerMoE expands dense models")
    cls = dense_model_class(model_type)
    if cls is None:
        raise InputError(f"{what} has no causal LM class in transformers {transformers.__version__}")
    return cls


def check_layout(model: nn.Module, model_type: str) -> Layout:
    """Where the layout says, `model` (a causal LM, e.g. built on the meta device) must have its decoder layers and
    an FFN module with parameters in each; returns the layout."""
    layout = layout_of(model_type)
    what = f"architecture {model_type!r} ({type(model).__name__})"
    try:
        layers = attribute_path(model, layout.decoder_layers)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise InputError(f"{what}: no decoder layers at {layout.decoder_layers} (its modules: {children})") from None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise InputError(f"{what}: {layout.decoder_layers} is not a list of decoder layers")
    ffn = getattr(layers[0], layout.ffn_module, None)
    if not isinstance(ffn, nn.Module) or not any(True for _ in ffn.parameters()):
        children = ", ".join(name for name, _ in layers[0].named_children())
        raise InputError(
            f"{what}: no FFN module {layout.ffn_module!r} in its decoder layer {type(layers[0]).__name__} "
            f"(its modules: {children})"
        )
    return layout


def expandable(config) -> tuple[type, Layout]:
    """(the dense causal LM class, its layout) of a model that can be expanded; a one-line error otherwise."""
    cls = causal_lm_class(config)
    with torch.device("meta"):
        model = cls(config)
    return cls, check_layout(model, config.model_type)


def embedding_name(model: nn.Module) -> str:
    """The name of a causal LM's input embedding matrix (`model.embed_tokens.weight` in most families)."""
    weight = model.get_input_embeddings().weight
    return next(name for name, param in model.named_parameters(remove_duplicate=False) if param is weight)


def dense_tensor_names(dense_cls: type, config, file_names) -> dict[str, str]:
    """Tensor name in a dense directory's files → the module name it loads into, as transformers' loader renames
    it (identity for most families; Gemma-3's wrapper is saved as `language_model.model.…`). A tensor transformers
    would convert by more than a rename (e.g. fusing experts) is refused: LayerMoE copies tensors, it never
    converts them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers that renames nothing on load
        return {name: name for name in file_names}
    with torch.device("meta"):
        model = dense_cls(config)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    names = {}
    for name in file_names:
        renamed, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if converter is not None:
            raise InputError(
                f"architecture {config.model_type!r}: transformers converts its tensor {name} on load ({converter}), "
                "not only renames it; LayerMoE reads dense tensors by name and cannot expand this checkpoint"
            )
        names[name] = renamed
    if any(old != new for old, new in names.items()):
        log.info(
            "%s: tensor names mapped as transformers loads them (e.g. %s)", config.model_type, _first_rename(names)
        )
    return names


def _first_rename(names: dict[str, str]) -> str:
    return next(f"{old} → {new}" for old, new in names.items() if old != new)
