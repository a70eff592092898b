"""Which expert sits in which DeepSpeed slot, and the names that follow from it.

DeepSpeed knows an expert-parallel layer's experts by slot (`ep_rank × experts_per_rank + local index`): it names
the parameters and the checkpoint's expert files by slot. The project deals experts to ranks round-robin by language
group (`expert_placement`), so slot and expert id differ as soon as a rank holds two or more experts. A checkpoint
records each layer's slot → expert id table (`expert_slots` in its marker); everything that rebuilds a model from
one maps its expert tensors by that table, never by slot. No DeepSpeed import here: checkpoints are read without it.
"""

from __future__ import annotations

from layermoe_ds.modeling.types import moe_blocks


def expert_placement(expert_groups: list[int], ep_size: int) -> list[int]:
    """Slot → new-expert id. Slots are split into contiguous per-rank chunks; dealing the experts, sorted by language
    group, round-robin over ranks spreads every group evenly (a lifelong run trains the newest group only, and each
    rank must own an equal share of what trains)."""
    order = sorted(range(len(expert_groups)), key=lambda e: (expert_groups[e], e))
    per_rank = [order[r::ep_size] for r in range(ep_size)]
    return [e for chunk in per_rank for e in chunk]


def model_slots(model) -> dict[int, list[int]]:
    """Layer → the expert id in each DeepSpeed slot of an expert-parallel training model (what a checkpoint
    records; empty for a dense model)."""
    return {layer: list(block.moe.placement) for layer, block in moe_blocks(model).items()}


def checkpoint_slots(marker: dict) -> dict[int, list[int]]:
    """Layer → the expert id in each slot of a checkpoint's expert files. A marker written before checkpoints
    recorded the table: derived from its layout and ep sizes, with the placement rule that wrote it."""
    if "expert_slots" in marker:
        return {int(layer): list(ids) for layer, ids in marker["expert_slots"].items()}
    groups = (marker.get("layout") or {}).get("expert_groups")
    if not groups:
        return {}
    return {int(layer): expert_placement(groups[int(layer)][1:], int(ep)) for layer, ep in marker["ep_sizes"].items()}
