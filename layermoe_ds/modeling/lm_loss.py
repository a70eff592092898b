"""The next-token loss without the [tokens × vocabulary] logits: the output projection and the cross-entropy fused
and chunked over tokens (as Liger's fused linear cross-entropy and torchtune's chunked loss do).

At a 152K vocabulary the logits of 256 tokens are 148 MiB in fp32, and Hugging Face's loss keeps several of them
alive at once (the logits, their shifted copy, the log-softmax, and in backward their gradient). Here one chunk's
logits exist at a time: each chunk's gradient with respect to the hidden states (and to the output weight, when it
trains) is computed in the forward pass, and backward only scales what was kept. Same loss as Hugging Face's
`ForCausalLMLoss`: targets are the labels shifted left, -100 is ignored, the mean is over counted tokens; the
logits are computed in the model's dtype and the softmax in fp32, as there.

Shape letters (`layermoe_ds/__init__.py`): T tokens (batch × length, flattened), C the tokens of one chunk, H
hidden size, V vocabulary.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_LOGITS_BYTES = 128 * 2**20  # one chunk's fp32 logits: 220 tokens at a 152K vocabulary


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES) -> int:
    return max(1, budget_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, chunk: int):
        counted_T = targets_T != IGNORE_INDEX
        counted = counted_T.sum().clamp(min=1)
        grad_hidden_TH = torch.zeros_like(hidden_TH) if hidden_TH.requires_grad else None
        grad_weight_VH = torch.zeros_like(weight_VH, dtype=torch.float32) if weight_VH.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
        for start in range(0, hidden_TH.shape[0], chunk):
            h_CH = hidden_TH[start : start + chunk]
            keep_C = counted_T[start : start + chunk]
            target_C = targets_T[start : start + chunk].clamp(min=0)
            logits_CV = (h_CH @ weight_VH.T).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_logit_C = logits_CV.gather(1, target_C[:, None]).squeeze(1)
            total += ((lse_C - target_logit_C) * keep_C).sum()
            # d(mean loss)/d logits = (softmax − one-hot) · scale, scale = 1/counted on counted tokens and 0 on the
            # others: softmax − one-hot in place over the logits, the scale applied to the [C × H] products instead
            # of the [C × V] logits (one pass over the chunk fewer).
            grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
            grad_CV[torch.arange(len(target_C), device=grad_CV.device), target_C] -= 1
            grad_CV = grad_CV.to(hidden_TH.dtype)
            scale_C1 = (keep_C / counted).to(hidden_TH.dtype)[:, None]
            if grad_hidden_TH is not None:
                grad_hidden_TH[start : start + chunk] = (grad_CV @ weight_VH) * scale_C1
            if grad_weight_VH is not None:
                grad_weight_VH += (grad_CV.T @ (h_CH * scale_C1)).float()
        ctx.save_for_backward(grad_hidden_TH, grad_weight_VH)
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_TH, grad_weight_VH = ctx.saved_tensors
        if grad_hidden_TH is not None:
            grad_hidden_TH = grad_hidden_TH * grad_loss.to(grad_hidden_TH.dtype)
        if grad_weight_VH is not None:
            grad_weight_VH = grad_weight_VH * grad_loss
        return grad_hidden_TH, grad_weight_VH, None, None


def linear_cross_entropy(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, chunk: int):
    """mean over counted tokens n of −log softmax(W h_n)[t_n], one chunk of `chunk` tokens' logits at a time."""
    if torch.is_grad_enabled() and (hidden_TH.requires_grad or weight_VH.requires_grad):
        return _LinearCrossEntropy.apply(hidden_TH, weight_VH, targets_T, chunk)
    return summed_nll(hidden_TH, weight_VH, targets_T, chunk) / (targets_T != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def summed_nll(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, chunk: int):
    """Σ over counted tokens n of −log softmax(W h_n)[t_n] in fp32 (no gradient), chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
    for start in range(0, hidden_TH.shape[0], chunk):
        logits_CV = (hidden_TH[start : start + chunk] @ weight_VH.T).float()
        total += F.cross_entropy(logits_CV, targets_T[start : start + chunk], reduction="sum")
    return total


@torch.no_grad()
def model_nll(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, targets_BL: torch.Tensor):
    """Σ −log p(targets) of a causal LM over the counted (≠ -100) targets, in fp32: through the final hidden
    states, chunked, when the head is plain; through the full logits otherwise (evaluation)."""
    if unusual_head(model):
        logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits.float()
        return F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten(), reduction="sum")
    hidden_BLH = model.model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).last_hidden_state
    hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
    chunk = chunk_tokens_for(model.config.vocab_size)
    return summed_nll(hidden_TH, model.get_output_embeddings().weight, targets_BL.reshape(-1), chunk)


def shifted_targets(labels_BL: torch.Tensor) -> torch.Tensor:
    """Each position's next token (-100 after the last), flattened: what `ForCausalLMLoss` compares logits with."""
    return F.pad(labels_BL, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)


def unusual_head(model) -> list[str]:
    """What keeps logits from being lm_head(the backbone's final hidden state) alone: no `.model` backbone or
    output embeddings (not a Hugging Face causal LM), a bias, soft-capping, a logit scale (Cohere multiplies,
    Granite divides)."""
    if not all(hasattr(model, name) for name in ("model", "config", "get_output_embeddings")):
        return ["no Hugging Face backbone and head"]
    config = model.config
    return [
        name
        for name, value in (
            ("an lm_head bias", getattr(model.get_output_embeddings(), "bias", None)),
            ("final_logit_softcapping", getattr(config, "final_logit_softcapping", None)),
            ("logit_scale", getattr(config, "logit_scale", None)),  # Cohere multiplies the logits
            ("logits_scaling", None if getattr(config, "logits_scaling", 1.0) == 1.0 else config.logits_scaling),
        )
        if value is not None
    ]


def use_chunked_loss(model, chunk: int | None = None) -> int:
    """Make `model(input_ids=…, labels=…)` return the fused, chunked loss (and no logits) for training; returns the
    tokens per chunk, or 0 with Hugging Face's loss left in place for a head it does not cover. The forward is
    replaced on this instance only: parameter names, checkpoints and exports are unchanged."""
    unusual = unusual_head(model)
    if unusual:
        log.warning("%s has %s: training with Hugging Face's loss (full logits)", type(model).__name__, unusual)
        return 0
    chunk = chunk or chunk_tokens_for(model.config.vocab_size)

    def forward(self, input_ids, labels, **kwargs):
        kwargs["use_cache"] = False
        hidden_BLH = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
        loss = linear_cross_entropy(hidden_TH, self.get_output_embeddings().weight, shifted_targets(labels), chunk)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return chunk
