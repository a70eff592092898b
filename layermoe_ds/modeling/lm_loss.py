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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from layermoe_ds.errors import InputError
from layermoe_ds.modeling.families import family_of

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_LOGITS_BYTES = 128 * 2**20  # one chunk's fp32 logits: 220 tokens at a 152K vocabulary


@dataclass(frozen=True)
class Head:
    """What a family's head does to `W h` before the softmax: a bias, a scale (Granite divides by
    `logits_scaling`, Cohere multiplies by `logit_scale`), Gemma's soft-capping c·tanh(x / c); which config fields
    a family's head reads is its `families.FAMILIES` entry."""

    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, h_CH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
        """fp32 logits of one chunk, the GEMM in the model's dtype."""
        z_CV = h_CH @ weight_VH.T
        if self.bias is not None:
            z_CV = z_CV + self.bias
        z_CV = z_CV.float()
        if self.scale != 1.0:
            z_CV.mul_(self.scale)
        if self.softcap is not None:  # in place: no [C × V] temporaries
            z_CV.div_(self.softcap).tanh_().mul_(self.softcap)
        return z_CV

    def backward_factor(self, logits_CV: torch.Tensor) -> torch.Tensor | float:
        """d logits / d (W h + b), elementwise: scale · (1 − (logits / c)²) with soft-capping."""
        if self.softcap is None:
            return self.scale
        factor_CV = (logits_CV / self.softcap).square_().neg_().add_(1)  # one [C × V] buffer
        return factor_CV.mul_(self.scale) if self.scale != 1.0 else factor_CV


PLAIN = Head()


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES, head: Head | None = None) -> int:
    """Tokens a chunk so that its fp32 [C × V] buffers (two with a soft-cap: the logits and their derivative) fit
    `budget_bytes`."""
    buffers = 2 if head is not None and head.softcap is not None else 1
    return max(1, budget_bytes // (4 * vocab_size * buffers))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, bias_V, targets_T, chunk: int, head: Head):
        counted_T = targets_T != IGNORE_INDEX
        counted = counted_T.sum().clamp(min=1)
        grad_hidden_TH = torch.zeros_like(hidden_TH) if hidden_TH.requires_grad else None
        grad_weight_VH = torch.zeros_like(weight_VH, dtype=torch.float32) if weight_VH.requires_grad else None
        trains_bias = bias_V is not None and bias_V.requires_grad
        grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32) if trains_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
        for start in range(0, hidden_TH.shape[0], chunk):
            h_CH = hidden_TH[start : start + chunk]
            keep_C = counted_T[start : start + chunk]
            target_C = targets_T[start : start + chunk].clamp(min=0)
            logits_CV = head.logits(h_CH, weight_VH)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_logit_C = logits_CV.gather(1, target_C[:, None]).squeeze(1)
            total += ((lse_C - target_logit_C) * keep_C).sum()
            factor = head.backward_factor(logits_CV)  # before the logits are overwritten
            # d(mean loss)/d logits = (softmax − one-hot) · scale, scale = 1/counted on counted tokens and 0 on the
            # others: softmax − one-hot in place over the logits, the scale applied to the [C × H] products instead
            # of the [C × V] logits (one pass over the chunk fewer).
            grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
            grad_CV[torch.arange(len(target_C), device=grad_CV.device), target_C] -= 1
            if not (isinstance(factor, float) and factor == 1.0):
                grad_CV = grad_CV.mul_(factor)  # through the soft-cap and the scale to W h + b
            if grad_bias_V is not None:
                grad_bias_V += (grad_CV * (keep_C / counted)[:, None]).sum(dim=0)
            grad_CV = grad_CV.to(hidden_TH.dtype)
            scale_C1 = (keep_C / counted).to(hidden_TH.dtype)[:, None]
            if grad_hidden_TH is not None:
                grad_hidden_TH[start : start + chunk] = (grad_CV @ weight_VH) * scale_C1
            if grad_weight_VH is not None:
                grad_weight_VH += (grad_CV.T @ (h_CH * scale_C1)).float()
        ctx.save_for_backward(grad_hidden_TH, grad_weight_VH, grad_bias_V)
        ctx.bias_dtype = None if bias_V is None else bias_V.dtype
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        grad_hidden_TH, grad_weight_VH, grad_bias_V = grads
        if grad_bias_V is not None:
            grad_bias_V = grad_bias_V.to(ctx.bias_dtype)
        return grad_hidden_TH, grad_weight_VH, grad_bias_V, None, None, None


def linear_cross_entropy(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, chunk: int, head: Head = PLAIN
):
    """mean over counted tokens n of −log softmax(head(W h_n))[t_n], one chunk of `chunk` tokens' logits at a time."""
    bias = head.bias
    trains = hidden_TH.requires_grad or weight_VH.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and trains:
        return _LinearCrossEntropy.apply(hidden_TH, weight_VH, bias, targets_T, chunk, head)
    return summed_nll(hidden_TH, weight_VH, targets_T, chunk, head) / (targets_T != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def summed_nll(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, chunk: int, head: Head = PLAIN
):
    """Σ over counted tokens n of −log softmax(head(W h_n))[t_n] in fp32 (no gradient), chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
    for start in range(0, hidden_TH.shape[0], chunk):
        logits_CV = head.logits(hidden_TH[start : start + chunk], weight_VH)
        total += F.cross_entropy(logits_CV, targets_T[start : start + chunk], reduction="sum")
    return total


@torch.no_grad()
def model_nll(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, targets_BL: torch.Tensor):
    """Σ −log p(targets) of a causal LM over the counted (≠ -100) targets, in fp32, through the final hidden
    states, chunked, with the family's head (evaluation); through the full logits for a model without a Hugging
    Face backbone and head."""
    head = head_of(model)
    if head is None:
        logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits.float()
        return F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten(), reduction="sum")
    hidden_BLH = model.model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).last_hidden_state
    hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
    chunk = chunk_tokens_for(model.config.get_text_config().vocab_size, head=head)
    return summed_nll(hidden_TH, model.get_output_embeddings().weight, targets_BL.reshape(-1), chunk, head)


def shifted_targets(labels_BL: torch.Tensor) -> torch.Tensor:
    """Each position's next token (-100 after the last), flattened: what `ForCausalLMLoss` compares logits with."""
    return F.pad(labels_BL, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)


def head_of(model) -> Head | None:
    """The family's head as the fused loss computes it (`Head`), or None for a model that is not a Hugging Face
    causal LM with a `.model` backbone and output embeddings."""
    if not all(hasattr(model, name) for name in ("model", "config", "get_output_embeddings")):
        return None
    config = model.config
    fields = family_of(getattr(config, "model_type", "")).head  # which config fields the family's head reads
    scale = 1.0
    if fields.divide_by and getattr(config, fields.divide_by, None):  # Granite: logits / logits_scaling
        scale /= float(getattr(config, fields.divide_by))
    if fields.multiply_by and getattr(config, fields.multiply_by, None) is not None:  # Cohere: · logit_scale
        scale *= float(getattr(config, fields.multiply_by))
    softcap = getattr(config, fields.softcap, None) if fields.softcap else None  # Gemma-2/3
    bias = getattr(model.get_output_embeddings(), "bias", None)
    return Head(bias=bias, scale=scale, softcap=float(softcap) if softcap else None)


def use_chunked_loss(model, chunk: int | None = None) -> int:
    """Make `model(input_ids=…, labels=…)` return the fused, chunked loss with the family's head (and no logits) for
    training; returns the tokens per chunk, or 0 with Hugging Face's loss left in place for a model without a
    Hugging Face backbone and head. The forward is replaced on this instance only: parameter names, checkpoints and
    exports are unchanged."""
    head = head_of(model)
    if head is None:
        log.warning(
            "%s is not a Hugging Face causal LM with a backbone and head: training with its own loss",
            type(model).__name__,
        )
        return 0
    chunk = chunk or chunk_tokens_for(model.config.get_text_config().vocab_size, head=head)

    def forward(self, input_ids, labels, **kwargs):
        kwargs["use_cache"] = False
        hidden_BLH = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
        weight = self.get_output_embeddings().weight
        loss = linear_cross_entropy(hidden_TH, weight, shifted_targets(labels), chunk, head)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return chunk


def check_fused_loss(model, what: str, tolerance: float | None = None) -> float:
    """The fused loss against the model's own (its full logits and Hugging Face's loss) on a tiny batch, before any
    work: a family whose head does something `Head` does not know is refused in one line naming the model, never
    trained or evaluated on a silently wrong loss. Returns the relative difference. Every rank of an
    expert-parallel model calls it together (the forward's all-to-all)."""
    head = head_of(model)
    if head is None:
        return 0.0
    parameter = next(model.parameters())
    tolerance = tolerance or (1e-5 if parameter.dtype == torch.float32 else 2e-2)
    vocab = model.config.get_text_config().vocab_size
    ids_BL = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(parameter.device)
    with torch.no_grad():
        own = type(model).forward(model, input_ids=ids_BL, labels=ids_BL, use_cache=False).loss.float()
        hidden_BLH = model.model(input_ids=ids_BL, use_cache=False).last_hidden_state
        hidden_TH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
        targets_T = shifted_targets(ids_BL)
        fused = summed_nll(
            hidden_TH, model.get_output_embeddings().weight, targets_T, chunk_tokens_for(vocab, head=head), head
        )
        fused = fused / (targets_T != IGNORE_INDEX).sum()
    relative = float((fused - own).abs() / own.abs().clamp_min(1e-12))
    if not relative <= tolerance:
        raise InputError(
            f"{what}: {type(model).__name__}'s own loss and the fused loss differ by {relative:.2e} (relative) on a "
            f"test batch: its head does something the fused loss does not cover (modeling/lm_loss.py, Head)"
        )
    return relative
