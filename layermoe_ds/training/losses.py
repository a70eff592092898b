"""Stage losses from the blocks' recorded auxiliary outputs (each block computed its own with its own N_i).

Stage 1: NTP + α · mean over MoE layers of the load-balance loss.
Stage 2: NTP + γ · L_LPR + η · L_cls (no balance loss), + β · L_anchor where a router anchor is on (not the
paper's; router_anchor.py). L_LPR is the paper's −log G(t) on router probabilities
(not the reference code's cross-entropy applied to probabilities, a double softmax): for a token of an earlier
group g it is −log Σ_{experts e of groups ≤ g} p_e, which for the original languages (g = 0) is −log p_0.
L_cls is the cross-entropy of the classifier logits against each token's language group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layermoe_ds.modeling.types import moe_blocks
from layermoe_ds.training.router_anchor import RouterAnchor, anchor_loss


@dataclass(frozen=True)
class LossWeights:
    """α (load balance, stage 1), γ (LPR), η (classifier), β (router anchor; stage 2)."""

    balance: float
    lpr: float
    cls: float
    anchor: float = 0.0  # off

    @classmethod
    def of(cls, config) -> LossWeights:
        """A run's weights, from its TrainConfig."""
        return cls(config.balance_alpha, config.lpr_gamma, config.cls_eta, config.router_anchor_beta)


@dataclass
class StageLosses:
    total: torch.Tensor
    ntp: torch.Tensor
    balance: torch.Tensor
    lpr: torch.Tensor
    cls: torch.Tensor
    anchor: torch.Tensor
    cls_correct: torch.Tensor | int  # device tensors in training: read with the step's metrics, not here
    cls_count: torch.Tensor | int


def lpr_loss(
    log_probs_TE: torch.Tensor, expert_groups: list[int], token_group_T: torch.Tensor, newest_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over tokens of earlier groups of −log Σ_{e: group(e) ≤ group(t)} p_e, and how many tokens counted (both
    device tensors: computed for every token and masked by weight, so no shape depends on the data)."""
    groups_E = torch.tensor(expert_groups, device=log_probs_TE.device)
    earlier_T = token_group_T < newest_group
    allowed_TE = groups_E[None, :] <= token_group_T[:, None]  # the newest group's tokens: every expert
    kept_TE = log_probs_TE.masked_fill(~allowed_TE, float("-inf"))
    return -(torch.logsumexp(kept_TE, dim=-1) * earlier_T).sum(), earlier_T.sum()


def token_mean(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ of per-layer (sum, tokens counted) pairs as one mean over every counted token; 0 when none counted."""
    return torch.stack([t for t, _ in terms]).sum() / torch.stack([n for _, n in terms]).sum().clamp_min(1)


def classifier_loss(
    logits_per_layer: list[torch.Tensor], token_group_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L_cls = mean over classifier layers of the cross-entropy of the classifier's logits (W_c · x_t) against each
    token's language group; with the correct (a device tensor) and total predictions, for the accuracy metric."""
    loss = torch.stack([F.cross_entropy(logits_TG, token_group_T) for logits_TG in logits_per_layer]).mean()
    correct = torch.stack([(logits_TG.argmax(-1) == token_group_T).sum() for logits_TG in logits_per_layer]).sum()
    return loss, correct, sum(logits_TG.shape[0] for logits_TG in logits_per_layer)


def stage_losses(
    model,
    ntp: torch.Tensor,
    token_group_BL: torch.Tensor,
    stage: int,
    weights: LossWeights,
    anchor: RouterAnchor | None = None,
) -> StageLosses:
    blocks = moe_blocks(model)
    zero = ntp.new_zeros(())
    balance = torch.stack([b.aux.balance_loss for b in blocks.values()]).mean() if blocks else zero
    token_group_T = token_group_BL.reshape(-1)
    lpr, cls, kept, correct, count = zero, zero, zero, 0, 0
    if stage == 2:
        newest = model.config.num_groups - 1
        lpr_terms = [
            lpr_loss(b.aux.router_log_probs_TE, b.gate.expert_groups, token_group_T, newest) for b in blocks.values()
        ]
        if lpr_terms:  # mean over the earlier groups' tokens and the MoE layers; 0 when the batch has none
            lpr = token_mean(lpr_terms)
        cls_terms = [b.aux.classifier_logits_TG for b in blocks.values() if b.aux.classifier_logits_TG is not None]
        if cls_terms:
            cls, correct, count = classifier_loss(cls_terms, token_group_T)
        if anchor is not None and blocks:  # mean over the newest group's tokens and the MoE layers
            kept = token_mean(
                [
                    anchor_loss(b.aux.router_log_probs_TE, anchor.log_probs[layer], token_group_T, newest)
                    for layer, b in blocks.items()
                ]
            )
        total = ntp + weights.lpr * lpr + weights.cls * cls + weights.anchor * kept
    else:
        total = ntp + weights.balance * balance
    return StageLosses(total, ntp, balance, lpr, cls, kept, correct, count)
