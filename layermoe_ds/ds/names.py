"""A LayerMoE block's tensor names: on disk, in DeepSpeed's training tree, and in exports written before 2026-12-07
(legacy).

On disk (exports, consolidated checkpoints, what `upcycle` and `grow` write, the inference model's own module tree),
per MoE layer `<ffn>` (e.g. `model.layers.3.mlp`):
- `<ffn>.experts.K.<projection>`: K = 0 is the original FFN, K = 1 … N−1 the new experts by id + 1;
- `<ffn>.router.weight`, and on classifier layers `<ffn>.classifier.weight`.

In training (`moe_layer.to_expert_parallel`) DeepSpeed holds a rank's new experts under its own module path,
numbered by slot (or local index), and expert 0 is `<ffn>.base_ffn`: DeepSpeed's checkpoints take every tensor whose
name contains "expert" for an expert's and leave it out of the model's own file. `disk_name` maps those names (and
the earlier exports' `base_ffn`, `gate.router`, `gate.lang_classifier`) to the names on disk: the state-dict
adapter between the two trees. No DeepSpeed import: checkpoints are read without it.
"""

from __future__ import annotations

import re

from layermoe_ds.modeling.families import expert_prefix

DS_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"  # the new experts' path in DeepSpeed's MoE module
TRAINING_EXPERT0 = "base_ffn"

# <decoder layers>.<layer>.<ffn>.<what>.<tensor>, where <what> is a training or legacy name
_TRAINING = re.compile(
    rf"^(?P<ffn>.+?\.(?P<layer>\d+)\.\w+)\.(?:(?P<base>{TRAINING_EXPERT0})|{re.escape(DS_EXPERTS)}\.(?P<index>\d+)"
    r"|gate\.(?P<gate>router|lang_classifier))\.(?P<tensor>.+)$"
)
# A new expert's tensor in the training tree: (layer, DeepSpeed index)
NEW_EXPERT = re.compile(rf"^.+?\.(\d+)\.\w+\.{re.escape(DS_EXPERTS)}\.(\d+)\.")


def disk_name(name: str, ids: dict[int, list[int]] | None = None) -> str:
    """The on-disk name of a training-tree or legacy tensor name (any other name unchanged). A DeepSpeed expert's
    index is a slot or a rank's local index: `ids[layer][index]` is the expert's id (None: the index is the id, as
    in a consolidated legacy export)."""
    match = _TRAINING.match(name)
    if match is None:
        return name
    ffn, tensor = match["ffn"], match["tensor"]
    if match["base"]:
        return f"{expert_prefix(ffn, 0)}.{tensor}"
    if match["gate"]:
        return f"{ffn}.{'router' if match['gate'] == 'router' else 'classifier'}.{tensor}"
    index = int(match["index"])
    expert_id = index if ids is None else ids[int(match["layer"])][index]
    return f"{expert_prefix(ffn, expert_id + 1)}.{tensor}"


def new_expert_index(name: str) -> tuple[int, int] | None:
    """(layer, DeepSpeed index) of a new expert's tensor in the training tree; None for any other tensor."""
    match = NEW_EXPERT.match(name)
    return None if match is None else (int(match[1]), int(match[2]))


def training_expert_prefix(ffn: str, index: int) -> str:
    """`<ffn>.<DeepSpeed's path>.<index>.`: where DeepSpeed keeps a new expert's tensors (its checkpoint files too)."""
    return f"{ffn}.{DS_EXPERTS}.{index}."


def expert_file(ordinal: int, slot: int) -> str:
    """DeepSpeed's checkpoint file of one expert slot of the `ordinal`-th MoE layer (layer order)."""
    return f"layer_{ordinal}_expert_{slot}_mp_rank_00_model_states.pt"


EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


def expert_optimizer_file(rank: int) -> str:
    """DeepSpeed's MoE optimizer state of one expert-parallel rank (without ZeRO)."""
    return f"expp_rank_{rank}_mp_rank_00_optim_states.pt"
