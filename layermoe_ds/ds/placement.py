"""Which expert sits in which DeepSpeed slot.

DeepSpeed knows an expert-parallel layer's experts by slot (`ep_rank × experts_per_rank + local index`): it names
the parameters and the checkpoint's expert files by slot. The project deals experts to ranks round-robin by language
group (`expert_placement`), so slot and expert id differ as soon as a rank holds two or more experts. A checkpoint
records each layer's slot → expert id table (`expert_slots` in its marker, `checkpoints/format.py`); everything that
rebuilds a model from one maps its expert tensors by that table, never by slot (`ds/names.py::disk_name`). No
DeepSpeed import here: checkpoints are read without it.
"""

from __future__ import annotations


def expert_placement(expert_groups: list[int], ep_size: int) -> list[int]:
    """Slot → new-expert id. Slots are split into contiguous per-rank chunks; dealing the experts, sorted by language
    group, round-robin over ranks spreads every group evenly (a lifelong run trains the newest group only, and each
    rank must own an equal share of what trains)."""
    order = sorted(range(len(expert_groups)), key=lambda e: (expert_groups[e], e))
    per_rank = [order[r::ep_size] for r in range(ep_size)]
    return [e for chunk in per_rank for e in chunk]
