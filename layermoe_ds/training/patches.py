"""Everything the training-time model has that the loaded model does not, applied in one place and logged: activation
checkpointing, the fused chunked loss (checked against the model's own first), the lean FFN backward, and stage 2's
router anchor. Each is a forward patch or a hook on the family's own modules; nothing else changes them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from layermoe_ds.modeling.lm_loss import check_fused_loss, use_chunked_loss
from layermoe_ds.training.lean_ffn import use_lean_ffn
from layermoe_ds.training.router_anchor import RouterAnchor

log = logging.getLogger(__name__)


@dataclass
class Patched:
    loss_chunk_tokens: int
    lean_ffns: int
    anchor: RouterAnchor | None


def apply_training_patches(model, config, stage: int) -> Patched:
    """Patch `model` (already on its device) for training under `config`; what was applied is logged and returned."""
    # Stage 2's anchor copies the routers as built (stage 1's), before any checkpoint of this run is loaded.
    anchor = RouterAnchor(model) if stage == 2 and config.router_anchor_beta > 0 else None
    if config.activation_checkpointing:
        # Non-reentrant: the reentrant variant runs the forward without autograd, so the balance, LPR and
        # classifier losses the blocks record on the side (block.aux) would get no gradient (tested), and with
        # frozen embeddings a layer's input needs none either, which it needs to backpropagate at all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # the model's own loss against the fused one on a test batch (no dropout), every rank at once
    check_fused_loss(model, f"train.model {config.model}")
    model.train()
    loss_chunk = use_chunked_loss(model)  # no [tokens × vocabulary] logits (lm_loss.py)
    lean = use_lean_ffn(model)  # two FFN activations kept for backward, not three (lean_ffn.py)
    applied = [
        "activation checkpointing (non-reentrant)" if config.activation_checkpointing else None,
        f"fused chunked loss ({loss_chunk} tokens a chunk)",
        f"lean FFN backward on {lean} FFNs",
        f"router anchor (β {config.router_anchor_beta})" if anchor is not None else None,
    ]
    log.info("training patches: %s", "; ".join(a for a in applied if a))
    return Patched(loss_chunk, lean, anchor)
