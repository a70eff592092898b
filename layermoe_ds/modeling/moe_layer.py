"""Expert-parallel new experts on DeepSpeed MoE (training path).

A layer's new experts (N_i − 1 of them) become a `deepspeed.moe.layer.MoE` with that layer's own ep_size, so
DeepSpeed owns the all-to-all, expert process groups, expert checkpoints and MoE optimizer groups. Routing is
decided by our `LayerMoEGate` (which also covers expert 0); DeepSpeed's `TopKGate` is replaced by `RouteAdapter`,
which turns those decisions into MOELayer's dispatch tuple. The decisions travel through `MoE.forward`'s
`used_token` argument, which DeepSpeed hands to the gate unchanged: no module state between the two calls, and the
combine weights keep their autograd graph back to the router. Expert 0 stays local (see LayerMoEBlock).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn


def choose_ep_size(num_new_experts: int, world_size: int, requested: int | str = "auto", layer: int = 0) -> int:
    """`auto`: the largest divisor of both the layer's new-expert count and the world size; an explicit size must
    divide both (a clear error otherwise, naming the layer)."""
    if requested == "auto":
        return math.gcd(num_new_experts, world_size)
    size = int(requested)
    if size < 1 or num_new_experts % size or world_size % size:
        raise ValueError(
            f"expert_parallel_size: {size} does not divide layer {layer}'s {num_new_experts} new experts and the "
            f"world size {world_size}; use 'auto' or re-allocate with `layermoe allocate --align {size}`"
        )
    return size


class RouteAdapter(nn.Module):
    """DeepSpeed MOELayer's gate interface over precomputed routes (no parameters).

    `forward(x[S,M], routes[S,2k])` with routes = [new-expert ids as float (−1 = none) | combine weights] returns
    `(l_aux, capacity, num_experts, indices[k,S] (−1 = dropped), locations[k,S], gates[k,S], exp_counts[E])`.
    Capacity: `capacity_factor · k·S/E` (at least `min_capacity`) when dropping in training, otherwise the largest
    expert load over the expert-parallel group (dropless; every rank must use the same capacity for the all-to-all).
    """

    def __init__(self, num_experts: int, capacity_factor: float, min_capacity: int, drop_tokens: bool):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor, self.min_capacity, self.drop_tokens = capacity_factor, min_capacity, drop_tokens
        self.ep_group = None
        self.dropped = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, hidden_SM: torch.Tensor, routes: torch.Tensor, *unused):
        top_k = routes.shape[1] // 2
        ids_KS = routes[:, :top_k].t().long()
        weights_KS = routes[:, top_k:].t()
        valid_KS = ids_KS >= 0
        # Position of each route in its expert's buffer, slot-major (all first choices before second choices).
        onehot_RE = F.one_hot(ids_KS.clamp_min(0).reshape(-1), self.num_experts) * valid_KS.reshape(-1, 1)
        position_RE = onehot_RE.cumsum(dim=0) - 1
        locations_KS = (position_RE * onehot_RE).sum(dim=1).reshape(ids_KS.shape)
        counts_E = onehot_RE.sum(dim=0)
        if self.drop_tokens and self.training:  # evaluation never drops a token, whatever the capacity setting
            per_expert = top_k * hidden_SM.shape[0] / self.num_experts
            capacity = torch.tensor(max(self.min_capacity, math.ceil(per_expert * self.capacity_factor)))
        else:
            capacity = counts_E.max().clamp_min(1).to(torch.long)
            if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
                torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        keep_KS = valid_KS & (locations_KS < capacity)
        self.dropped = int((valid_KS & ~keep_KS).sum())
        indices_KS = ids_KS.masked_fill(~keep_KS, -1)
        gates_KS = torch.where(keep_KS, weights_KS, torch.zeros_like(weights_KS)).float()
        l_aux = hidden_SM.new_zeros(())  # our gate computes the balance loss (with expert 0 included)
        return l_aux, capacity, self.num_experts, indices_KS, locations_KS.masked_fill(~keep_KS, 0), gates_KS, counts_E


class DeepSpeedNewExperts(MoE):
    """A layer's new experts on DeepSpeed MoE; same call as `LocalNewExperts`: (x[T,H], ids[T,k], w[T,k])."""

    def __init__(
        self,
        expert: nn.Module,
        hidden_size: int,
        num_experts: int,
        ep_size: int,
        capacity_factor: float = 1.25,
        min_capacity: int = 4,
        drop_tokens: bool = True,
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

    def forward(self, hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        routes = torch.cat([ids_TK.to(weights_TK.dtype), weights_TK], dim=1)
        out, _, _ = super().forward(hidden_TH, routes)
        return out.float(), self.deepspeed_moe.gate.dropped


def block_to_expert_parallel(
    block,
    hidden_size: int,
    world_size: int,
    ep_size: int | str = "auto",
    capacity_factor: float = 1.25,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    layer: int = 0,
) -> int:
    """Swap one block's local new experts for DeepSpeed's expert-parallel MoE, keeping this rank's share of the
    weights (global expert g lives on expert-parallel rank g // (E / ep_size)). Returns the ep_size used."""
    from deepspeed.utils import groups

    local = block.moe
    num_new = len(local.experts)
    ep = choose_ep_size(num_new, world_size, ep_size, layer)
    moe = DeepSpeedNewExperts(
        copy.deepcopy(local.experts[0]), hidden_size, num_new, ep, capacity_factor, min_capacity, drop_tokens
    )
    moe.set_deepspeed_parallelism()
    ep_rank = groups._get_expert_parallel_rank(moe.expert_group_name)
    per_rank = num_new // ep
    for local_id, target in enumerate(moe.experts):
        source = local.experts[ep_rank * per_rank + local_id]
        target.load_state_dict(source.state_dict())
        for p_target, p_source in zip(target.parameters(), source.parameters(), strict=True):
            p_target.requires_grad_(p_source.requires_grad)
    moe.global_ids = [ep_rank * per_rank + local_id for local_id in range(per_rank)]
    block.moe = moe.to(next(block.base_ffn.parameters()).device)
    return ep


def to_expert_parallel(
    model,
    world_size: int,
    ep_size: int | str = "auto",
    capacity_factor: float = 1.25,
    min_capacity: int = 4,
    drop_tokens: bool = True,
) -> dict[int, int]:
    """Every MoE layer of a LayerMoE model onto DeepSpeed MoE, each with its own ep_size; returns layer → ep_size.

    torch.distributed (via deepspeed.init_distributed) must be initialised; expert process groups are created here
    so the weights can be placed before `deepspeed.initialize`.
    """
    return {
        layer: block_to_expert_parallel(
            block, model.config.hidden_size, world_size, ep_size, capacity_factor, min_capacity, drop_tokens, layer
        )
        for layer, block in model.moe_blocks().items()
    }
