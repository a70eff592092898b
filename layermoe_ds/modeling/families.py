"""Which dense models can be expanded, and the one place that knows where a family keeps its parts.

Any Hugging Face causal LM whose decoder layers hold a feed-forward module can be expanded: its LayerMoE config and
model classes are derived from transformers' own (`modeling/remote/`), so no family is written out by hand. A
family's layout — the attribute path to its decoder layers, the name of the FFN in a layer — is the default
(`model.layers`, `mlp`) unless `LAYOUTS` says otherwise. A model that cannot be expanded is refused in one line
naming what was found: an encoder-decoder, a mixture of experts already, no causal LM class, no decoder layers or
no FFN where the layout says. `TESTED` lists the families the test suite runs end to end (the README's table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from layermoe_ds.modeling.remote.modeling_layermoe import attribute_path


@dataclass(frozen=True)
class Layout:
    decoder_layers: str = "model.layers"  # from the causal LM to its nn.ModuleList of decoder layers
    ffn_module: str = "mlp"  # the decoder layer's feed-forward attribute


DEFAULT = Layout()
LAYOUTS: dict[str, Layout] = {}  # dense model_type → its layout, where it is not the default

# Every family the tests expand, train, export, load and generate with (tests/test_families.py).
TESTED = (
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma2",
    "gemma3_text",
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
        raise ValueError(f"{what} is an encoder-decoder; LayerMoE expands decoder-only causal LMs")
    moe = [f"{name} = {getattr(config, name)}" for name in MOE_FIELDS if getattr(config, name, None)]
    if moe:
        raise ValueError(f"{what} is a mixture of experts already ({', '.join(moe)}); LayerMoE expands dense models")
    cls = dense_model_class(model_type)
    if cls is None:
        raise ValueError(f"{what} has no causal LM class in transformers {transformers.__version__}")
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
        raise ValueError(f"{what}: no decoder layers at {layout.decoder_layers} (its modules: {children})") from None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{what}: {layout.decoder_layers} is not a list of decoder layers")
    ffn = getattr(layers[0], layout.ffn_module, None)
    if not isinstance(ffn, nn.Module) or not any(True for _ in ffn.parameters()):
        children = ", ".join(name for name, _ in layers[0].named_children())
        raise ValueError(
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
