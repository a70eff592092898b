"""What each training stage trains: a declared table, applied in one place, with counts logged per group.

Stage 1 (learn the new languages): the routers and the new experts of the newest language group.
Stage 2 (review): the routers and the language classifiers only; every expert, expert 0 included, is frozen.
Embeddings, attention, norms, the LM head and expert 0 never train.
The dense full fine-tune (`train.full_finetune`, the forgetting baseline) trains every parameter instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from torch import nn

from layermoe_ds.ds.names import new_expert_index
from layermoe_ds.errors import InputError
from layermoe_ds.modeling.families import disk_expert

log = logging.getLogger(__name__)

# Inside a LayerMoE block, whatever the family calls its FFN (`modeling/families.py`); the same in the training tree
# and on disk (`ds/names.py`).
ROUTER = re.compile(r"\.\d+\.\w+\.router\.weight$")
CLASSIFIER = re.compile(r"\.\d+\.\w+\.classifier\.weight$")


def _router(model, name: str) -> bool:
    return ROUTER.search(name) is not None


def _classifier(model, name: str) -> bool:
    return CLASSIFIER.search(name) is not None


def _newest_group_expert(model, name: str) -> bool:
    """Is this tensor one of the new experts the newest language group added (in the training tree, DeepSpeed's
    index mapped to the expert's id)?"""
    training, loaded = new_expert_index(name), disk_expert(name)
    if training is None and (loaded is None or loaded[1] == 0):
        return False
    blocks = model.moe_blocks()
    if training is not None:
        layer, index = training
        expert_id = blocks[layer].moe.global_ids[index]
    else:
        layer, expert_id = loaded[0], loaded[1] - 1
    return blocks[layer].gate.expert_groups[1 + expert_id] == model.config.num_groups - 1


# stage → trainable parameter groups: (group name, does (model, parameter name) belong to it)
STAGE_TABLE: dict[int, tuple[tuple[str, Callable[[nn.Module, str], bool]], ...]] = {
    1: (("routers", _router), ("new_experts", _newest_group_expert)),
    2: (("routers", _router), ("classifiers", _classifier)),
}


def trained_group(model: nn.Module, name: str, stage: int) -> str | None:
    """The stage's parameter group that trains parameter `name`, or None when it stays frozen."""
    if stage not in STAGE_TABLE:
        raise InputError(f"stage: {stage} is not one of {sorted(STAGE_TABLE)}")
    return next((group for group, belongs in STAGE_TABLE[stage] if belongs(model, name)), None)


def apply_stage(model: nn.Module, stage: int) -> dict[str, list[nn.Parameter]]:
    """Freeze everything, then unfreeze what `stage` trains; returns group name → trainable parameters."""
    if stage not in STAGE_TABLE:
        raise InputError(f"stage: {stage} is not one of {sorted(STAGE_TABLE)}")
    groups: dict[str, list[nn.Parameter]] = {name: [] for name, _ in STAGE_TABLE[stage]}
    frozen = 0
    for name, param in model.named_parameters():
        group = trained_group(model, name, stage)
        param.requires_grad_(group is not None)
        if group is not None:
            groups[group].append(param)
        else:
            frozen += param.numel()
    counts = {group: sum(p.numel() for p in params) for group, params in groups.items()}
    described = {g: f"{n:,}" for g, n in counts.items()}
    if "new_experts" in counts:  # expert parallelism gives each rank a share of the new experts
        described["new_experts"] += f" on this rank ({_newest_experts_in_all(model):,} over all ranks)"
    log.info(
        "stage %d trains %s parameters; %s frozen on this rank",
        stage,
        ", ".join(f"{g}: {n}" for g, n in described.items()),
        f"{frozen:,}",
    )
    if not any(counts.values()):
        raise InputError(f"stage {stage}: the model has nothing to train (no MoE layer or no new experts)")
    return groups


def _newest_experts_in_all(model: nn.Module) -> int:
    """The parameters of the newest language group's experts in the whole model, whichever rank holds them."""
    newest = model.config.num_groups - 1
    return sum(
        sum(group == newest for group in block.gate.expert_groups) * sum(p.numel() for p in block.expert0.parameters())
        for block in model.moe_blocks().values()
    )


def apply_full_finetune(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The forgetting baseline: every parameter of the dense model trains, as one group."""
    params = [param.requires_grad_(True) for param in model.parameters()]
    log.info("full fine-tune trains all %s parameters", f"{sum(p.numel() for p in params):,}")
    return {"all": params}
