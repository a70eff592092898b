"""The model a training rank holds: built as shapes, made expert-parallel, then materialised by name.

Stage 1 from a dense model (upcycled on the fly), stage 2 and lifelong stage 1 from a LayerMoE directory: the whole
LayerMoE model is built with its parameters on the meta device (hf/materialize.py), its new experts are
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


@dataclass(frozen=True)
class ModelSource:
    """The model a run starts from, resolved once per run (`resolve_model`) and handed down: its directory, the
    config this run's model is built from (the dense config for the full fine-tune), its class, and the allocation
    a dense base is upcycled with on the fly (None: a LayerMoE base, or the dense baseline)."""

    path: Path
    config: object
    model_cls: type | None  # None: the dense full fine-tune, loaded as it is
    allocation: dict | None

    @property
    def from_dense(self) -> bool:
        return self.allocation is not None


def resolve_model(config: TrainConfig, stage: int) -> ModelSource:
    """Everything about the model that can be refused before a process group exists, read once: its files, what it
    is, the allocation it is upcycled with or was built from, its context against `train.seq_len`, its language
    groups against `train.language_groups`."""
    model_dir = check_model_dir(Path(config.model))
    hf_config = model_config(model_dir)
    if config.full_finetune:
        if stage != 1 or is_layermoe(hf_config):
            raise InputError(
                f"train.full_finetune: the dense baseline is a stage-1 run from a dense model "
                f"(stage {stage}, model {config.model} is {'a LayerMoE' if is_layermoe(hf_config) else 'dense'})"
            )
        check_context(hf_config, config.seq_len, "train.seq_len")
        return ModelSource(model_dir, hf_config, None, None)
    allocation = read_json(Path(config.allocation), "allocation") if config.allocation else None
    if not is_layermoe(hf_config):
        if stage != 1 or allocation is None:
            raise InputError(
                f"train.model: {config.model} is a dense model; stage 1 upcycles it when "
                "train.allocation is given, stage 2 needs the stage-1 model"
            )
        moe_config, model_cls = upcycled_config(hf_config, allocation)
        source = ModelSource(model_dir, moe_config, model_cls, allocation)
    else:
        config_cls, model_cls = layermoe_classes(hf_config.model_type)
        moe_config = config_cls.from_pretrained(model_dir)
        if allocation is not None:
            history = (moe_config.allocation or {}).get("history", [{}])
            if history[-1].get("experts_per_layer") != allocation["experts_per_layer"]:
                raise InputError(
                    f"train.allocation: {config.allocation} ({allocation['experts_per_layer']}) is not the allocation "
                    f"{config.model} was built from ({history[-1].get('experts_per_layer')})"
                )
        source = ModelSource(model_dir, moe_config, model_cls, None)
    check_context(source.config, config.seq_len, "train.seq_len")
    if source.config.num_groups != len(config.language_groups):
        raise InputError(
            f"train.language_groups: {len(config.language_groups)} groups, but the model knows "
            f"{source.config.num_groups} (old + one per expansion)"
        )
    return source


def build_model(
    source: ModelSource, config: TrainConfig, stage: int, world_size: int, dtype: torch.dtype, device: torch.device
) -> Built:
    """This rank's training model on `device` (see the module docstring) from the resolved `source`. `dtype`: the
    DeepSpeed JSON's precision."""
    if source.model_cls is None:
        model = load_causal_lm(source.path, dtype, device).train()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        census = {"tensors": len(list(model.parameters())), "bytes": size, "experts": {}}
        return Built(model, {}, apply_full_finetune(model), census)
    with parameters_on_meta():
        model = source.model_cls(source.config)
    ep_sizes = to_expert_parallel(
        model, world_size, config.expert_parallel_size, config.capacity_factor, drop_tokens=config.drop_tokens
    )
    global_ids = {layer: block.moe.global_ids for layer, block in model.moe_blocks().items()}
    from_base = base_loader(model, source.path, source.from_dense, config.seed)

    def load(name: str, param: nn.Parameter) -> torch.Tensor:
        return from_base(disk_name(name, global_ids), param)  # training name → disk name (local expert → its id)

    def dtype_of(name: str, param: nn.Parameter) -> torch.dtype:
        # Stage 2 trains the gates in fp32 beside frozen tensors in the JSON's precision (ds/engine.py explains).
        return torch.float32 if stage == 2 and trained_group(model, name, stage) else dtype

    loaded = materialize(model, load, dtype_of, device)
    carry_generation_config(model, source.path)
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
