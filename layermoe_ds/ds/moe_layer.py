"""Expert-parallel new experts on DeepSpeed MoE (training path).

A layer's new experts (N_i − 1 of them) become a `deepspeed.moe.layer.MoE` with that layer's own ep_size, so
DeepSpeed owns the all-to-all, expert process groups, expert checkpoints and MoE optimizer groups. Routing is
decided by our `LayerMoEGate` (which also covers expert 0); DeepSpeed's `TopKGate` is replaced by `RouteAdapter`,
which turns those decisions into MOELayer's dispatch tuple. The decisions travel through `MoE.forward`'s
`used_token` argument, which DeepSpeed hands to the gate unchanged: no module state between the two calls, and the
combine weights keep their autograd graph back to the router. Expert 0 stays local (see LayerMoEBlock).

Shape letters (`layermoe_ds/__init__.py`): S tokens and M hidden size (DeepSpeed's names), T tokens and H hidden
size on our side, K routes per token, E experts, R routes.
"""

from __future__ import annotations

import copy
import math

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from layermoe_ds.ds.internals import expert_parallel_rank
from layermoe_ds.ds.names import disk_name
from layermoe_ds.ds.placement import expert_placement
from layermoe_ds.errors import InputError


def choose_ep_size(
    num_new_experts: int, world_size: int, requested: int | str = "auto", layer: int = 0, trainable: int | None = None
) -> int:
    """`auto`: the largest divisor of the layer's new-expert count, the world size and (lifelong) the number of
    experts this run trains in the layer, so every rank holds the same number of them — ZeRO needs the same
    parameter groups on every rank. An explicit size must divide all of them (a clear error names the layer)."""
    counts = [num_new_experts, world_size] + ([trainable] if trainable else [])
    if requested == "auto":
        return math.gcd(*counts)
    size = int(requested)
    if size < 1 or any(n % size for n in counts):
        raise InputError(
            f"expert_parallel_size: {size} does not divide layer {layer}'s {num_new_experts} new experts "
            f"({trainable or num_new_experts} trained now) and the world size {world_size}; use 'auto' or "
            f"re-allocate with `layermoe allocate --align {size}`"
        )
    return size


class RouteAdapter(nn.Module):
    """DeepSpeed MOELayer's gate interface over precomputed routes (no parameters).

    `forward(x[S,M], routes[S,2k])` with routes = [new-expert slots as float (−1 = none) | combine weights] returns
    `(l_aux, capacity, num_experts, indices[k,S] (−1 = dropped), locations[k,S], gates[k,S], exp_counts[E])`. The
    capacity is the host int that `DeepSpeedNewExperts` set in `self.capacity` for this call (agreed over the
    expert-parallel group): so MOELayer's `int(C)` reads nothing from the device.
    """

    def __init__(self, num_experts: int, capacity_factor: float, min_capacity: int, drop_tokens: bool):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor, self.min_capacity, self.drop_tokens = capacity_factor, min_capacity, drop_tokens
        self.ep_group = None
        self.capacity: int | None = None
        self.dropped: torch.Tensor | int = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, hidden_SM: torch.Tensor, routes: torch.Tensor, *unused):
        top_k = routes.shape[1] // 2
        ids_KS = routes[:, :top_k].t().long()
        weights_KS = routes[:, top_k:].t()
        valid_KS = ids_KS >= 0
        # Position of each route in its expert's buffer, slot-major (all first choices before second choices).
        # (A comparison, not F.one_hot, which checks its input's range on the host.)
        experts_E = torch.arange(self.num_experts, device=ids_KS.device)
        onehot_RE = ((ids_KS.reshape(-1, 1) == experts_E) & valid_KS.reshape(-1, 1)).long()
        position_RE = onehot_RE.cumsum(dim=0) - 1
        locations_KS = (position_RE * onehot_RE).sum(dim=1).reshape(ids_KS.shape)
        counts_E = onehot_RE.sum(dim=0)
        capacity, self.capacity = self.capacity, None
        assert capacity is not None, "RouteAdapter: the capacity is set by DeepSpeedNewExperts for each call"
        keep_KS = valid_KS & (locations_KS < capacity)
        self.dropped = (valid_KS & ~keep_KS).sum()  # a device tensor: read with the step's metrics
        indices_KS = ids_KS.masked_fill(~keep_KS, -1)
        gates_KS = torch.where(keep_KS, weights_KS, torch.zeros_like(weights_KS)).float()
        l_aux = hidden_SM.new_zeros(())  # our gate computes the balance loss (with expert 0 included)
        return l_aux, capacity, self.num_experts, indices_KS, locations_KS.masked_fill(~keep_KS, 0), gates_KS, counts_E


class DeepSpeedNewExperts(MoE):
    """A layer's new experts on DeepSpeed MoE; called as `LayerMoEBlock._new_experts` is: (x[T,H], ids[T,k], w[T,k])."""

    def __init__(
        self,
        expert: nn.Module,
        hidden_size: int,
        num_experts: int,
        ep_size: int,
        capacity_factor: float = 1.25,
        min_capacity: int = 4,
        drop_tokens: bool = False,
    ):
        super().__init__(
            hidden_size,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            drop_tokens=drop_tokens,
            use_rts=False,
        )
        # Replace TopKGate (and its unused wg parameter) before deepspeed.initialize sees the module.
        self.deepspeed_moe.gate = RouteAdapter(num_experts, capacity_factor, min_capacity, drop_tokens)

    @property
    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, load_E: torch.Tensor):
        """→ (fp32 output, dropped routes as a device tensor, routes to expert 0 as a host int). The layer's one host
        read: the capacity (agreed over the expert-parallel group) and expert 0's count, together."""
        slots_TK = torch.where(ids_TK >= 0, self.slot_of_expert.to(ids_TK.device)[ids_TK.clamp_min(0)], ids_TK)
        routes = torch.cat([slots_TK.to(weights_TK.dtype), weights_TK], dim=1)
        adapter = self.deepspeed_moe.gate
        new_load_E = load_E[1:]
        if adapter.drop_tokens and self.training:  # a fixed capacity; evaluation never drops a token
            per_expert = ids_TK.shape[1] * hidden_TH.shape[0] / adapter.num_experts
            capacity = max(adapter.min_capacity, math.ceil(per_expert * adapter.capacity_factor))
            count0 = int(load_E[0])
        else:  # dropless: the largest expert load, the same on every rank of the group (the all-to-all needs it)
            largest = new_load_E.max().clamp_min(1)
            if adapter.ep_group is not None and torch.distributed.get_world_size(adapter.ep_group) > 1:
                torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=adapter.ep_group)
            capacity, count0 = torch.stack([largest, load_E[0]]).tolist()
        # How far the [E, C, H] buffers are padded above the mean load (dropless pads every expert to the largest).
        self.capacity_over_mean_load = capacity / new_load_E.float().mean().clamp_min(1.0)
        adapter.capacity = capacity
        out, _, _ = super().forward(hidden_TH, routes)
        return out.float(), adapter.dropped, count0


def block_to_expert_parallel(
    block,
    hidden_size: int,
    world_size: int,
    ep_size: int | str = "auto",
    capacity_factor: float = 1.25,
    min_capacity: int = 4,
    drop_tokens: bool = False,
    layer: int = 0,
    trained_group: int | None = None,
) -> int:
    """Swap one block's local new experts for DeepSpeed's expert-parallel MoE, keeping this rank's share of the
    weights (placement: `expert_placement`). `trained_group`: the language group whose experts this run trains
    (each rank gets an equal share of them). Returns the ep_size used."""
    local = tuple(block.experts)[1:]
    num_new = len(local)
    expert_groups = list(block.gate.expert_groups[1:])
    trainable = sum(g == trained_group for g in expert_groups) if trained_group is not None else None
    ep = choose_ep_size(num_new, world_size, ep_size, layer, trainable)
    moe = DeepSpeedNewExperts(
        copy.deepcopy(local[0]), hidden_size, num_new, ep, capacity_factor, min_capacity, drop_tokens
    )
    moe.set_deepspeed_parallelism()
    ep_rank = expert_parallel_rank(moe.expert_group_name)
    per_rank = num_new // ep
    placement = expert_placement(expert_groups, ep)
    moe.placement = placement  # slot → expert id, every rank's: what a checkpoint records (checkpoints/format.py)
    moe.global_ids = placement[ep_rank * per_rank : (ep_rank + 1) * per_rank]
    slot_of_expert = torch.empty(num_new, dtype=torch.long)
    slot_of_expert[torch.tensor(placement)] = torch.arange(num_new)
    moe.register_buffer("slot_of_expert", slot_of_expert, persistent=False)
    for target, source_id in zip(moe.experts, moe.global_ids, strict=True):
        source = local[source_id]
        target.load_state_dict(source.state_dict())
        for p_target, p_source in zip(target.parameters(), source.parameters(), strict=True):
            p_target.requires_grad_(p_source.requires_grad)
    expert0 = block.experts[0]
    device = next(expert0.parameters()).device
    # The training tree (ds/names.py): expert 0 as `base_ffn`, the new experts in DeepSpeed's module.
    del block.experts
    block.base_ffn = expert0
    # A model still on the meta device (training/build.py) is materialised later, parameters only: the routing
    # buffer (slot_of_expert) must stay real.
    block.moe = moe if device.type == "meta" else moe.to(device)
    block.register_load_state_dict_pre_hook(_legacy_gate_names)
    return ep


def _legacy_gate_names(module, state_dict, prefix, *args) -> None:
    """A training checkpoint written with the legacy gate names (`gate.router`, `gate.lang_classifier`) resumes."""
    for key in [k for k in state_dict if k.startswith(prefix + "gate.")]:
        state_dict[disk_name(key)] = state_dict.pop(key)


def to_expert_parallel(
    model,
    world_size: int,
    ep_size: int | str = "auto",
    capacity_factor: float = 1.25,
    min_capacity: int = 4,
    drop_tokens: bool = False,
) -> dict[int, int]:
    """Every MoE layer of a LayerMoE model onto DeepSpeed MoE, each with its own ep_size; returns layer → ep_size.
    The newest language group's experts (what a run trains) are spread evenly over each layer's ranks.

    torch.distributed (via deepspeed.init_distributed) must be initialised; expert process groups are created here
    so the weights can be placed before `deepspeed.initialize`.
    """
    newest = model.config.num_groups - 1
    return {
        layer: block_to_expert_parallel(
            block,
            model.config.get_text_config().hidden_size,
            world_size,
            ep_size,
            capacity_factor,
            min_capacity,
            drop_tokens,
            layer,
            trained_group=newest,
        )
        for layer, block in model.moe_blocks().items()
    }
