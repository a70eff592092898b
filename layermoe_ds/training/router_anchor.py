"""Stage 2's router anchor (`router_anchor_beta`): keep the newest language group's routing as stage 1 learned it.

LPR pulls each router's expert-0 probability up on old-language tokens. A router is one linear map of the hidden
state, so the pull also reaches the new languages' tokens, which drift back to expert 0 and give back what stage 1
taught them. The anchor holds each router's stage-1 weights, frozen, and adds β · the mean over the newest group's
tokens and the MoE layers of KL(p_stage1 ‖ p_now), both read on the gate's current input: the new languages keep
their stage-1 routing while the old ones go back to expert 0.

The reference weights are copied when the model is built from the stage-1 model directory, before any checkpoint
of this stage is loaded, so a resumed run anchors to the same routers. Nothing here is saved or exported: the
exported model is the paper's, only its stage-2 training differs.
"""

from __future__ import annotations

import torch

from layermoe_ds.modeling.remote.layermoe_block import fp32_linear
from layermoe_ds.modeling.types import moe_blocks


class RouterAnchor:
    """Each MoE layer's router weights as built (stage 1's), and the log-probabilities they give the gate's input in
    the current forward (recorded by a forward pre-hook; no gradient)."""

    def __init__(self, model) -> None:
        self.reference: dict[int, torch.Tensor] = {}
        self.log_probs: dict[int, torch.Tensor] = {}
        for layer, block in moe_blocks(model).items():
            self.reference[layer] = block.router.weight.detach().float().clone()
            block.gate.register_forward_pre_hook(self._recorder(layer))

    def _recorder(self, layer: int):
        def record(gate, args, kwargs=None) -> None:
            hidden_BLH = args[0]
            with torch.no_grad():  # the gate's own fp32 projection, with stage 1's weights
                logits = fp32_linear(hidden_BLH.reshape(-1, hidden_BLH.shape[-1]), self.reference[layer])
                self.log_probs[layer] = torch.log_softmax(logits, dim=-1)

        return record


def anchor_loss(
    log_probs_TE: torch.Tensor, reference_TE: torch.Tensor, token_group_T: torch.Tensor, newest_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over the newest group's tokens of KL(reference ‖ current) and how many tokens counted (device tensors,
    masked by weight: no shape depends on the data)."""
    newest_T = token_group_T == newest_group
    kl_T = (reference_TE.exp() * (reference_TE - log_probs_TE)).sum(dim=-1)
    return (kl_T * newest_T).sum(), newest_T.sum()
