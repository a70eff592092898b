"""The LayerMoE FFN block: router + optional language classifier (the gate), expert 0 = the original FFN, new experts.

Routing (MoE-LPR / LayerMoE): router logits in fp32, softmax over the layer's N experts, top-k (k clipped to N),
weights renormalised over the k chosen. With a classifier and classifier routing on, a token classified "old"
(class 0) goes to expert 0 alone with weight 1; a token of class g may use only experts added by groups ≤ g.
Each block records its own auxiliary outputs (`block.aux`) for the training loop: load-balance loss with its own
N, router log-probabilities (for the LPR loss), classifier logits, expert load and dropped-route counts.

Shape letters (as in `layermoe_ds/__init__.py`; this file also ships alone, for `trust_remote_code`): B batch rows,
L sequence length (positions), T tokens (B·L flattened), H hidden size, E experts of a layer (expert 0 first), K
routes per token (top-k), G language groups (classifier classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .prefix_state import PrefixContext


@dataclass
class MoEAux:
    balance_loss: torch.Tensor  # scalar, N · Σ_e f_e P_e with this layer's N (f_e sums to k, as in the reference)
    router_log_probs_TE: torch.Tensor  # fp32
    classifier_logits_TG: torch.Tensor | None  # fp32, None when the layer has no classifier
    expert_load_E: torch.Tensor  # routes per expert this forward (expert 0 first)
    dropped: int | torch.Tensor  # routes dropped for capacity (only the expert-parallel training path drops)
    expert_ids_TK: torch.Tensor | None = None  # the routes taken (after any classifier override), for evaluation


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long, -1 = unused slot
    weights_TK: torch.Tensor  # fp32, 0 on unused slots; sums to 1 per token


class _Fp32Linear(torch.autograd.Function):
    """x·Wᵀ computed in fp32 (the router's and classifier's precision) while saving x in its own dtype: autograd
    would keep the fp32 upcast of a bf16 input ([T, H], 4 bytes an element) alive until the backward."""

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TH, weight_EH)
        return F.linear(x_TH.float(), weight_EH.float())

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TH, weight_EH = ctx.saved_tensors
        grad_x = (grad_TE @ weight_EH.float()).to(x_TH.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_TE.t() @ x_TH.float()).to(weight_EH.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def fp32_linear(x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
    return _Fp32Linear.apply(x_TH, weight_EH) if torch.is_grad_enabled() else F.linear(x_TH.float(), weight_EH.float())


class _ScaledIndexAdd(torch.autograd.Function):
    """out + index_add(rows `index` += routed·w) accumulated in fp32, saving `routed` in the experts' dtype (not the
    fp32 upcast autograd would keep for w's gradient)."""

    @staticmethod
    def forward(ctx, out_TH, index_R, routed_RH, weight_R):
        ctx.save_for_backward(index_R, routed_RH, weight_R)
        return out_TH.index_add(0, index_R, routed_RH.float() * weight_R[:, None])

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        index_R, routed_RH, weight_R = ctx.saved_tensors
        grad_RH = grad_TH.index_select(0, index_R)
        grad_routed = (grad_RH * weight_R[:, None]).to(routed_RH.dtype) if ctx.needs_input_grad[2] else None
        grad_weight = (grad_RH * routed_RH.float()).sum(dim=-1) if ctx.needs_input_grad[3] else None
        return grad_TH, None, grad_routed, grad_weight


def scaled_index_add(
    out_TH: torch.Tensor, index_R: torch.Tensor, routed_RH: torch.Tensor, weight_R: torch.Tensor
) -> torch.Tensor:
    """`out_TH` (fp32) with routed·w added at rows `index_R`: out of place under autograd, in place without it."""
    if torch.is_grad_enabled():
        return _ScaledIndexAdd.apply(out_TH, index_R, routed_RH, weight_R)
    return out_TH.index_add_(0, index_R, routed_RH.float() * weight_R[:, None])


def prefix_mean(hidden_BLH: torch.Tensor) -> torch.Tensor:
    """Causal running mean over positions: position t sees only tokens ≤ t (no future-token leakage)."""
    steps = torch.arange(1, hidden_BLH.shape[1] + 1, device=hidden_BLH.device, dtype=torch.float32)
    return hidden_BLH.float().cumsum(dim=1) / steps[None, :, None]


class LayerMoEGate(nn.Module):
    """The routing rule of one layer (no parameters: the router W_r ∈ R^{h×N} and, on classifier layers, the
    classifier W_c ∈ R^{h×G} are the block's, `router` and `classifier`, bias-free)."""

    def __init__(self, expert_groups: Sequence[int], top_k: int, classifier_mode: str = "per-token"):
        super().__init__()
        self.num_experts = len(expert_groups)
        self.top_k = min(top_k, self.num_experts)
        self.classifier_mode = classifier_mode
        # A plain attribute, not a buffer: HF's from_pretrained leaves non-persistent buffers uninitialised.
        self.expert_groups = tuple(int(g) for g in expert_groups)
        self._group_of: dict[torch.device, torch.Tensor] = {}
        self.prefix_context: PrefixContext | None = None  # set by the model around a forward (prefix_state.py)

    def group_of(self, device: torch.device) -> torch.Tensor:
        """The language group that added each expert (expert 0: group 0), as a tensor on `device`."""
        if device not in self._group_of:
            self._group_of[device] = torch.tensor(self.expert_groups, dtype=torch.long, device=device)
        return self._group_of[device]

    def forward(
        self,
        hidden_BLH: torch.Tensor,
        router_EH: torch.Tensor,
        classifier_GH: torch.Tensor | None,
        classifier_routing: bool,
        force_base: bool = False,
        max_group: int | None = None,
    ) -> tuple[Routing, MoEAux]:
        """Route tokens. `force_base` sends every token to expert 0 alone (the dense model); `max_group` = g uses
        only experts and classes of groups ≤ g (the model as it was before later expansions)."""
        hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
        log_probs_TE = torch.log_softmax(fp32_linear(hidden_TH, router_EH), dim=-1)
        probs_TE = log_probs_TE.exp()
        classifier_logits_TG = None
        if classifier_GH is not None:
            if self.classifier_mode == "per-token":
                features = hidden_BLH
            elif self.prefix_context is not None:  # generation: continues the cached positions' sums, no padding
                features = self.prefix_context.features(hidden_BLH)
            else:
                features = prefix_mean(hidden_BLH)
            classifier_logits_TG = fp32_linear(features.reshape(hidden_TH.shape), classifier_GH)
        classes_T = token_classes(
            classifier_logits_TG if classifier_routing else None,
            probs_TE.shape[0],
            force_base,
            max_group,
            probs_TE.device,
        )
        allowed_TE = None if classes_T is None else self.group_of(probs_TE.device)[None, :] <= classes_T[:, None]
        routing = top_k_routing(probs_TE, self.top_k, allowed_TE)
        aux = MoEAux(
            balance_loss(probs_TE, self.top_k),
            log_probs_TE,
            classifier_logits_TG,
            expert_load(routing.expert_ids_TK, self.num_experts),
            0,
        )
        return routing, aux


def expert_load(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert (unused slots, id −1, counted nowhere), computed on the device without a host read."""
    valid = (ids_TK >= 0).reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=ids_TK.device).scatter_add_(
        0, ids_TK.clamp_min(0).reshape(-1), valid
    )


def balance_loss(probs_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The load-balancing loss of one layer (MoE-LPR/LayerMoE stage 1): L_bal = N · Σ_e f_e · P_e, with N this
    layer's expert count, f_e the share of tokens whose top-k (the router's own choice, before any classifier
    override) includes expert e (Σ_e f_e = k, as in the reference) and P_e the mean router probability of e."""
    _, chosen_TK = probs_TE.topk(top_k, dim=-1)
    f_E = torch.zeros_like(probs_TE).scatter_(1, chosen_TK, 1.0).mean(0)
    return probs_TE.shape[1] * (f_E * probs_TE.mean(0)).sum()


def token_classes(
    classifier_logits_TG: torch.Tensor | None,
    num_tokens: int,
    force_base: bool,
    max_group: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The language group c_t whose experts each token may use (experts of groups ≤ c_t), or None when routing is
    unrestricted. Classifier routing (LayerMoE): c_t = argmax of the classifier, so a token classified old (0) gets
    expert 0 alone; `force_base`: c_t = 0 for all; `max_group` = g caps c_t at g (and the classifier's choice to
    classes ≤ g)."""
    if force_base:
        return torch.zeros(num_tokens, dtype=torch.long, device=device)
    if classifier_logits_TG is not None:
        usable = classifier_logits_TG if max_group is None else classifier_logits_TG[:, : max_group + 1]
        return usable.argmax(dim=-1)
    if max_group is not None:
        return torch.full((num_tokens,), max_group, dtype=torch.long, device=device)
    return None


def top_k_routing(probs_TE: torch.Tensor, top_k: int, allowed_TE: torch.Tensor | None) -> Routing:
    """The k most probable experts among the allowed ones, weights renormalised over those chosen:
    w_tk = p_{t,e_k} / Σ_j p_{t,e_j}. A token with fewer than k allowed experts leaves slots unused (id −1)."""
    if allowed_TE is None:
        top_p_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
        valid_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    else:
        top_p_TK, ids_TK = probs_TE.masked_fill(~allowed_TE, -1.0).topk(top_k, dim=-1)
        valid_TK = top_p_TK >= 0
    top_p_TK = top_p_TK.clamp_min(0.0) * valid_TK
    weights_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return Routing(ids_TK.masked_fill(~valid_TK, -1), weights_TK)


def grouped_dispatch(
    hidden_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    experts: Sequence[nn.Module],
    counts: Sequence[int],
) -> torch.Tensor:
    """Σ_k w_tk · expert_{id_tk}(x_t): routes sorted by expert, one contiguous GEMM batch per expert, no token loop.

    `counts`: routes per expert, on the host (the caller's one read of the device); slots with id −1 sort last and
    are never run. Every shape here follows from the input's and from `counts`: no further host read. Accumulation is
    in fp32; experts with no token are not run.
    """
    num_tokens, top_k = ids_TK.shape
    flat_ids = ids_TK.reshape(-1)
    token_of_route = torch.arange(num_tokens, device=hidden_TH.device)[:, None].expand(-1, top_k).reshape(-1)
    order = torch.argsort(torch.where(flat_ids >= 0, flat_ids, len(experts)), stable=True)
    token_sorted, weight_sorted = token_of_route[order], weights_TK.reshape(-1)[order]
    out_TH = torch.zeros(hidden_TH.shape, dtype=torch.float32, device=hidden_TH.device)
    start = 0
    for expert_id, count in enumerate(counts):
        if count == 0:
            continue
        index = token_sorted[start : start + count]
        routed = experts[expert_id](hidden_TH.index_select(0, index))
        out_TH = scaled_index_add(out_TH, index, routed, weight_sorted[start : start + count])
        start += count
    return out_TH


def dense_dispatch(
    hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: Sequence[nn.Module]
) -> torch.Tensor:
    """The same sum with every expert run on every token (weight 0 where not routed): no host read at all, for the
    few tokens of a decoding step on an accelerator (`dense_for`)."""
    out_TH = torch.zeros(hidden_TH.shape, dtype=torch.float32, device=hidden_TH.device)
    every_T = torch.arange(hidden_TH.shape[0], device=hidden_TH.device)
    for expert_id, expert in enumerate(experts):
        weight_T = (weights_TK * (ids_TK == expert_id)).sum(dim=-1)
        out_TH = scaled_index_add(out_TH, every_T, expert(hidden_TH), weight_T)
    return out_TH


# Up to this many tokens a forward (a decoding step's batch), on an accelerator, the local new experts may all run on
# every token (`dense_for`).
DENSE_DISPATCH_TOKENS = 64


def dense_for(hidden_TH: torch.Tensor) -> bool:
    """Run every expert on a decoding step's few tokens instead of reading the loads to the host? Under torch.compile
    or CUDA-graph capture, where no host read may happen, and on an accelerator, where the read stalls the stream for
    about as long as reading the unused experts' weights takes. Never on the CPU: there the read is free and the
    unused experts' weights are the cost (decoding reads only the experts the tokens chose)."""
    if hidden_TH.shape[0] > DENSE_DISPATCH_TOKENS:
        return False
    return torch.compiler.is_compiling() or hidden_TH.device.type != "cpu"


class LayerMoEBlock(nn.Module):
    """Replaces a decoder layer's FFN. Its parameters are named as an exported model stores them:
    `experts.K.<projection>` (K = 0: the original FFN, frozen; 1…N−1: the new experts), `router.weight` and, on
    classifier layers, `classifier.weight`.

    Expert 0 runs locally for the tokens routed to it. The new experts run here (`experts[1:]`), or — in training,
    after layermoe_ds's expert-parallel conversion — in a DeepSpeed MoE module `moe`, with expert 0 as `base_ffn`
    (DeepSpeed's checkpoints treat any parameter whose name contains "expert" as an expert's)."""

    def __init__(self, experts: Sequence[nn.Module], gate: LayerMoEGate, hidden: int, num_classes: int = 0):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden, gate.num_experts, bias=False)
        self.classifier = nn.Linear(hidden, num_classes, bias=False) if num_classes else None
        self.gate = gate
        self.classifier_routing = True
        self.force_base = False  # every token to expert 0 alone: the original dense model (a diagnostic)
        self.max_group: int | None = None  # only experts of groups ≤ this: the model before later expansions
        self.aux: MoEAux | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def expert0(self) -> nn.Module:
        """The original FFN."""
        return self.experts[0] if "experts" in self._modules else self.base_ffn

    def _new_experts(self, hidden_TH, ids_TK, weights_TK, load_E):
        """New-expert ids 0..E−1 (−1 = not a new-expert route), `load_E` routes per expert of the layer (expert 0
        first) → (fp32 output, dropped routes, routes to expert 0 as a host int or None when not read). Here: one
        host read (the loads), none where `dense_for` runs every expert; in training, DeepSpeed's MoE."""
        if "moe" in self._modules:
            return self.moe(hidden_TH, ids_TK, weights_TK, load_E)
        new = tuple(self.experts)[1:]
        if dense_for(hidden_TH):
            return dense_dispatch(hidden_TH, ids_TK, weights_TK, new), 0, None
        counts = load_E.tolist()
        return grouped_dispatch(hidden_TH, ids_TK, weights_TK, new, counts[1:]), 0, counts[0]

    def forward(self, hidden_BLH: torch.Tensor) -> torch.Tensor:
        classifier = None if self.classifier is None else self.classifier.weight
        routing, aux = self.gate(
            hidden_BLH, self.router.weight, classifier, self.classifier_routing, self.force_base, self.max_group
        )
        hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
        ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK
        # New experts: ids shifted to 0..E-1; expert-0 and unused slots become -1.
        new_ids_TK = torch.where(ids_TK >= 1, ids_TK - 1, torch.full_like(ids_TK, -1))
        new_weights_TK = torch.where(new_ids_TK >= 0, weights_TK, 0.0)
        out_TH, dropped, count0 = self._new_experts(hidden_TH, new_ids_TK, new_weights_TK, aux.expert_load_E)
        # Expert 0 once, locally, for the tokens that routed to it (no all-to-all; frozen, so no gradient traffic):
        # those tokens sort first, and `count0` (read with what the new experts needed) says how many there are.
        expert0 = self.expert0
        routed0_T = ids_TK == 0
        weight0_T = (weights_TK * routed0_T).sum(dim=-1)
        if count0 is None:  # a decoding step: every token through expert 0, weighted (0 where not routed)
            every_T = torch.arange(hidden_TH.shape[0], device=hidden_TH.device)
            out_TH = scaled_index_add(out_TH, every_T, expert0(hidden_TH), weight0_T)
        elif count0:
            first = torch.argsort(routed0_T.any(dim=-1).to(torch.uint8), descending=True, stable=True)
            index0 = first[:count0]
            routed = expert0(hidden_TH.index_select(0, index0))
            out_TH = scaled_index_add(out_TH, index0, routed, weight0_T[index0])
        aux.dropped = dropped
        aux.expert_ids_TK = ids_TK
        self.aux = aux
        return out_TH.to(hidden_BLH.dtype).reshape(hidden_BLH.shape)
