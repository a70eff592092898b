"""The model a training rank holds: built as shapes, made expert-parallel, then materialised by name.

Stage 1 from a dense model (upcycled on the fly), stage 2 and lifelong stage 1 from a LayerMoE directory: the whole
LayerMoE model is built with its parameters on the meta device (modeling/materialize.py), its new experts are
swapped for DeepSpeed's expert-parallel layers (which hold only this rank's experts), the stage's table decides what
trains, and only then is every remaining parameter read from the safetensors by name, straight in the run's dtype:
the frozen tensors in the DeepSpeed JSON's precision, and in stage 2 the trainable gates in fp32. So a rank never
holds an fp32 copy of the model, an expert it does not own, or a random initialisation that loading overwrites.
The dense full fine-tune loads the dense model in the run's dtype (every parameter trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layermoe_ds.config import TrainConfig
from layermoe_ds.ds.moe_layer import to_expert_parallel
from layermoe_ds.ds.names import disk_name, new_expert_index
from layermoe_ds.errors import InputError
from layermoe_ds.hf.load import carry_generation_config, check_context, check_model_dir, load_causal_lm
from layermoe_ds.hf.materialize import materialize, parameters_on_meta
from layermoe_ds.io import read_json
from layermoe_ds.modeling.base_tensors import base_loader
from layermoe_ds.modeling.types import is_layermoe, layermoe_classes, model_config
from layermoe_ds.modeling.upcycle import upcycled_config
from layermoe_ds.training.stages import apply_full_finetune, apply_stage, trained_group


@dataclass
class Built:
    model: nn.Module
    ep_sizes: dict[int, int]
    trainable: dict[str, list[nn.Parameter]]
    census: dict  # what this rank materialised: tensors, bytes, and the global ids of its experts per layer


def _config_for(config: TrainConfig, stage: int):
    """(LayerMoE config, model class, upcycling from dense?) after the checks that need no weights."""
    model_dir = Path(config.model)
    hf_config = model_config(model_dir)
    if not is_layermoe(hf_config):
        if stage != 1 or not config.allocation:
            raise InputError(
                f"train.model: {config.model} is a dense model; stage 1 upcycles it when "
                "train.allocation is given, stage 2 needs the stage-1 model"
            )
        moe_config, model_cls = upcycled_config(hf_config, read_json(Path(config.allocation), "allocation"))
        return moe_config, model_cls, True
    config_cls, model_cls = layermoe_classes(hf_config.model_type)
    moe_config = config_cls.from_pretrained(model_dir)
    if config.allocation:
        wanted = read_json(Path(config.allocation), "allocation")["experts_per_layer"]
        history = (moe_config.allocation or {}).get("history", [{}])
        if history[-1].get("experts_per_layer") != wanted:
            raise InputError(
                f"train.allocation: {config.allocation} ({wanted}) is not the allocation "
                f"{config.model} was built from ({history[-1].get('experts_per_layer')})"
            )
    return moe_config, model_cls, False


def check_model(config: TrainConfig, stage: int):
    """Everything about the model that can be refused before a process group exists; returns its config."""
    check_model_dir(Path(config.model))
    if config.full_finetune:
        hf_config = model_config(Path(config.model))
        if stage != 1 or is_layermoe(hf_config):
            raise InputError(
                f"train.full_finetune: the dense baseline is a stage-1 run from a dense model "
                f"(stage {stage}, model {config.model} is {'a LayerMoE' if is_layermoe(hf_config) else 'dense'})"
            )
        check_context(hf_config, config.seq_len, "train.seq_len")
        return hf_config
    moe_config, _, _ = _config_for(config, stage)
    check_context(moe_config, config.seq_len, "train.seq_len")
    if moe_config.num_groups != len(config.language_groups):
        raise InputError(
            f"train.language_groups: {len(config.language_groups)} groups, but the model knows "
            f"{moe_config.num_groups} (old + one per expansion)"
        )
    return moe_config


def build_model(config: TrainConfig, stage: int, world_size: int, dtype: torch.dtype, device: torch.device) -> Built:
    """This rank's training model on `device` (see the module docstring), for a `config` that `check_model` passed.
    `dtype`: the DeepSpeed JSON's precision."""
    if config.full_finetune:
        model = load_causal_lm(Path(config.model), dtype, device).train()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        census = {"tensors": len(list(model.parameters())), "bytes": size, "experts": {}}
        return Built(model, {}, apply_full_finetune(model), census)
    moe_config, model_cls, from_dense = _config_for(config, stage)
    with parameters_on_meta():
        model = model_cls(moe_config)
    ep_sizes = to_expert_parallel(
        model, world_size, config.expert_parallel_size, config.capacity_factor, drop_tokens=config.drop_tokens
    )
    global_ids = {layer: block.moe.global_ids for layer, block in model.moe_blocks().items()}
    from_base = base_loader(model, Path(config.model), from_dense, config.seed)

    def load(name: str, param: nn.Parameter) -> torch.Tensor:
        return from_base(disk_name(name, global_ids), param)  # training name → disk name (local expert → its id)

    def dtype_of(name: str, param: nn.Parameter) -> torch.dtype:
        # Stage 2 trains the gates in fp32 beside frozen tensors in the JSON's precision (engine.py explains).
        return torch.float32 if stage == 2 and trained_group(model, name, stage) else dtype

    loaded = materialize(model, load, dtype_of, device)
    carry_generation_config(model, Path(config.model))
    model.set_classifier_routing(stage == 2)
    trainable = apply_stage(model, stage)
    experts: dict[int, list[int]] = {}
    for name in loaded:
        where = new_expert_index(name)
        if where is not None and name.endswith(".weight"):
            layer, gid = where[0], global_ids[where[0]][where[1]]
            if gid not in experts.setdefault(layer, []):
                experts[layer].append(gid)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    census = {"tensors": len(loaded), "bytes": size, "experts": {str(k): sorted(v) for k, v in experts.items()}}
    return Built(model.train(), ep_sizes, trainable, census)
