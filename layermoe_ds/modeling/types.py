"""The LayerMoE architectures: for each dense `model_type` its LayerMoE config and model classes (registered with
transformers' Auto classes on import, so LayerMoE directories load without a remote-code prompt), and the questions
"is this a LayerMoE model" and "which LayerMoE type is this directory"."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from layermoe_ds.modeling.remote.configuration_layermoe import (
    LayerMoELlamaConfig,
    LayerMoEMistralConfig,
    LayerMoEQwen2Config,
)
from layermoe_ds.modeling.remote.modeling_layermoe import (
    LayerMoELlamaForCausalLM,
    LayerMoEMistralForCausalLM,
    LayerMoEQwen2ForCausalLM,
)

# dense model_type → (LayerMoE config class, LayerMoE model class)
ARCHITECTURES = {
    "llama": (LayerMoELlamaConfig, LayerMoELlamaForCausalLM),
    "qwen2": (LayerMoEQwen2Config, LayerMoEQwen2ForCausalLM),
    "mistral": (LayerMoEMistralConfig, LayerMoEMistralForCausalLM),
}
LAYERMOE_TYPES = {cfg.model_type: (cfg, cls) for cfg, cls in ARCHITECTURES.values()}

for _model_type, (_config_cls, _model_cls) in LAYERMOE_TYPES.items():
    AutoConfig.register(_model_type, _config_cls, exist_ok=True)
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")


def is_layermoe(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "") in LAYERMOE_TYPES


def moe_blocks(model) -> dict:
    """Layer → LayerMoE block; empty for a dense model (the base, or the full fine-tune baseline)."""
    return model.moe_blocks() if is_layermoe(model) else {}


def layermoe_model_type(path: Path) -> str | None:
    """The LayerMoE model_type of a model directory, None for any other model."""
    config = json.loads((Path(path) / "config.json").read_text())
    model_type = config.get("model_type")
    return model_type if model_type in LAYERMOE_TYPES else None
