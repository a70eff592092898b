"""The LayerMoE architectures: for a dense causal LM its LayerMoE config and model classes (derived from
transformers' own, `modeling/remote/`, and registered with transformers' Auto classes when first made, so LayerMoE
directories load without a remote-code prompt), and the questions "is this a LayerMoE model" and "which LayerMoE
type is this directory"."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoConfig

from layermoe_ds.errors import InputError
from layermoe_ds.modeling.families import PREFIX, causal_lm_class, dense_model_class
from layermoe_ds.modeling.remote.modeling_layermoe import layermoe_model_class


def _registered(config_cls: type, model_cls: type) -> tuple[type, type]:
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModelForCausalLM")
    return config_cls, model_cls


def expanded_classes(dense_config) -> tuple[type, type]:
    """(LayerMoE config class, LayerMoE model class) expanding a dense config's architecture (checked)."""
    model_cls = layermoe_model_class(causal_lm_class(dense_config))
    return _registered(model_cls.config_class, model_cls)


def layermoe_classes(model_type: str) -> tuple[type, type]:
    """The classes of a LayerMoE model_type (`layermoe_<dense model_type>`)."""
    dense = dense_model_class(model_type.removeprefix(PREFIX)) if model_type.startswith(PREFIX) else None
    if dense is None:
        raise InputError(
            f"model_type {model_type!r} is not a LayerMoE type this transformers ({transformers.__version__}) can build"
        )
    model_cls = layermoe_model_class(dense)
    return _registered(model_cls.config_class, model_cls)


def is_layermoe(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "")).startswith(PREFIX)


def moe_blocks(model) -> dict:
    """Layer → LayerMoE block; empty for a dense model (the base, or the full fine-tune baseline)."""
    return model.moe_blocks() if is_layermoe(model) else {}


def layermoe_model_type(path: Path) -> str | None:
    """The LayerMoE model_type of a model directory (its classes registered), None for any other model."""
    config = json.loads((Path(path) / "config.json").read_text())
    model_type = str(config.get("model_type", ""))
    if not model_type.startswith(PREFIX):
        return None
    layermoe_classes(model_type)
    return model_type


def model_config(path: Path):
    """A model directory's config through transformers' AutoConfig, LayerMoE or dense (LayerMoE classes registered
    first: no remote-code prompt)."""
    layermoe_model_type(path)
    return AutoConfig.from_pretrained(path)
