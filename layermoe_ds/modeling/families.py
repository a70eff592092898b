"""Which dense models can be expanded, and the one table of what a family does differently (`FAMILIES`).

Any Hugging Face causal LM whose decoder layers hold a feed-forward module can be expanded: its LayerMoE config and
model classes are derived from transformers' own (`modeling/remote/`), so no family is written out by hand. What
the project's own code must know of a family is its `Family` entry; a family without one is the default:

- `layout`: the attribute path to its decoder layers and the name of the FFN in a layer (`model.layers`, `mlp`;
  Gemma-3's multimodal wrapper keeps its language model's layers under `model.language_model`). Upcycling, sizing,
  profiling and loading read it.
- `head`: the config fields its LM head reads besides `W h + b` (Granite divides by `logits_scaling`, Cohere
  multiplies by `logit_scale`, Gemma-2/3 soft-cap by `final_logit_softcapping`). The fused loss reads it
  (`lm_loss.head_of`), and checks itself against the model's own loss before any work, so a family that does
  more is refused, never trained on a wrong loss.
- `ffn`: where its gated FFN keeps its projections and activation (separate `gate_proj`/`up_proj`, or Phi-3's
  fused `gate_up_proj`), or None for an FFN that is not gated (StarCoder2). The lean FFN backward reads it.

Tensor renames are not in the table: transformers' own conversion mapping for the family gives them
(`dense_tensor_names`). A model that cannot be expanded is refused in one line naming what was found: an
encoder-decoder, a mixture of experts already, no causal LM class, no decoder layers or no FFN where the layout
says. `TESTED` lists the families the test suite runs end to end (the README's and docs/model.md's tables).
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

    def expert(self, layer: int, k: int) -> str:
        """The name of layer `layer`'s expert `k` in a LayerMoE model on disk (k = 0 the original FFN)."""
        return expert_prefix(self.ffn(layer), k)

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer, the rest of the name) for a tensor inside a layer's FFN or block; None for any other tensor."""
        match = re.match(rf"{re.escape(self.decoder_layers)}\.(\d+)\.{re.escape(self.ffn_module)}\.(.+)$", name)
        return (int(match[1]), match[2]) if match else None


def expert_prefix(ffn: str, k: int) -> str:
    """`<ffn>.experts.<k>`: where a LayerMoE block keeps expert `k`'s tensors (the exported model's module path)."""
    return f"{ffn}.experts.{k}"


_DISK_EXPERT = re.compile(r"\.(\d+)\.\w+\.experts\.(\d+)\.")


def disk_expert(name: str) -> tuple[int, int] | None:
    """(layer, k) of a tensor of expert k of a LayerMoE block as named on disk and in the loaded model (k = 0 the
    original FFN); None for any other tensor."""
    match = _DISK_EXPERT.search(name)
    return None if match is None else (int(match[1]), int(match[2]))


@dataclass(frozen=True)
class HeadFields:
    """The config fields a family's LM head reads: logits = softcap(scale · (W h + b)), scale = multiply / divide."""

    divide_by: str | None = None
    multiply_by: str | None = None
    softcap: str | None = None


@dataclass(frozen=True)
class GatedFFN:
    """Where a family's gated FFN keeps its parts: `down(act(gate(x)) · up(x))`, the gate and up projections either
    separate or one fused module whose output is [gate, up] (Phi-3)."""

    down: str = "down_proj"
    activation: str = "act_fn"
    gate: str = "gate_proj"
    up: str | None = "up_proj"  # None: `gate` is the fused gate-and-up projection

    def matches(self, module: nn.Module) -> bool:
        return all(hasattr(module, n) for n in (self.down, self.activation, self.gate, self.up) if n is not None)


@dataclass(frozen=True)
class Family:
    layout: Layout = Layout()
    head: HeadFields = HeadFields()
    ffn: GatedFFN | None = GatedFFN()  # None: not a gated FFN (no lean backward)


DEFAULT = Layout()
PREFIX = "layermoe_"  # a LayerMoE model_type is this before its dense model_type
_SOFTCAP = HeadFields(softcap="final_logit_softcapping")
# dense model_type → what its family does differently from the default
FAMILIES: dict[str, Family] = {
    "gemma2": Family(head=_SOFTCAP),
    "gemma3_text": Family(head=_SOFTCAP),
    "gemma3": Family(Layout("model.language_model.layers"), head=_SOFTCAP),
    "granite": Family(head=HeadFields(divide_by="logits_scaling")),
    "cohere": Family(head=HeadFields(multiply_by="logit_scale")),
    "cohere2": Family(head=HeadFields(multiply_by="logit_scale")),
    "phi3": Family(ffn=GatedFFN(activation="activation_fn", gate="gate_up_proj", up=None)),
    "starcoder2": Family(ffn=None),
}

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


def family_of(model_type: str) -> Family:
    """The table entry of a dense model_type, or of the one a LayerMoE model_type (`layermoe_<dense>`) expands."""
    return FAMILIES.get(model_type.removeprefix(PREFIX), Family())


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
    layout = family_of(model_type).layout
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
