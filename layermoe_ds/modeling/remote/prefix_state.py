"""The `prefix-mean` classifier's features through generation: position t's feature is the mean of the layer's
hidden states over the non-padding tokens ≤ t of its sequence, also when the tokens before it are in the KV cache.

For each classifier layer the model keeps the running sums and counts of every position seen so far beside the KV
cache (as an attribute of the cache object), so a cached step continues the sums of the steps before it; padding
(a 0 in the attention mask) is excluded; a cache cropped back (assisted decoding) is followed by slicing the
sums to the cache's length, and beam search reorders them with the cache (`LayerMoEMixin._reorder_cache`). Without
a context (training, evaluation of packed rows) the block takes the plain running mean over the row.

Shape letters as in layermoe_block.py; P positions in the cache before this forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STORE = "layermoe_prefix_sums"  # the cache object's attribute holding layer → (sums_BPH, counts_BP)


@dataclass
class PrefixContext:
    """What one classifier layer needs for one forward, and where it leaves its sums for the next."""

    mask_BL: torch.Tensor | None  # 1 for real tokens of this forward, 0 for padding; None: all real
    past: tuple[torch.Tensor, torch.Tensor] | None  # (sums_BPH, counts_BP) of the cached positions
    sums: tuple[torch.Tensor, torch.Tensor] | None = field(default=None)  # every position's, after the forward

    def features(self, hidden_BLH: torch.Tensor) -> torch.Tensor:
        h_BLH = hidden_BLH.float()
        ones_BL = torch.ones(h_BLH.shape[:2], device=h_BLH.device)
        mask_BL = ones_BL if self.mask_BL is None else self.mask_BL.to(h_BLH.device, torch.float32)
        sums_BLH = (h_BLH * mask_BL[..., None]).cumsum(dim=1)
        counts_BL = mask_BL.cumsum(dim=1)
        if self.past is not None and self.past[1].shape[1]:
            past_sums_BPH, past_counts_BP = self.past
            sums_BLH = sums_BLH + past_sums_BPH[:, -1:]
            counts_BL = counts_BL + past_counts_BP[:, -1:]
            self.sums = (torch.cat([past_sums_BPH, sums_BLH], 1), torch.cat([past_counts_BP, counts_BL], 1))
        else:
            self.sums = (sums_BLH, counts_BL)
        return sums_BLH / counts_BL.clamp_min(1.0)[..., None]


def contexts_for(
    layers: list[int], batch: int, length: int, attention_mask, past_key_values
) -> dict[int, PrefixContext]:
    """Each prefix-mean layer's context for a forward over `length` new positions of `batch` sequences."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        past_length, mask_BL = attention_mask.shape[1] - length, attention_mask[:, -length:]
    else:
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask_BL = None
    store = getattr(past_key_values, STORE, None) if past_length else None
    if past_length:
        known = None if store is None else next(iter(store.values()))[1]
        if known is None or known.shape[1] < past_length or known.shape[0] != batch:
            seen = "none" if known is None else f"{known.shape[1]} positions of {known.shape[0]} sequences"
            raise ValueError(
                f"prefix-mean classifier: the cache holds {past_length} positions of {batch} sequences, its running "
                f"sums {seen}: continue generation with the cache this model returned (a cache reordered or "
                "expanded outside generate() is not supported)"
            )
    contexts = {}
    for layer in layers:
        past = None
        if past_length:
            sums_BPH, counts_BP = store[layer]
            past = (sums_BPH[:, :past_length], counts_BP[:, :past_length])  # a cropped cache: its length counts
        contexts[layer] = PrefixContext(mask_BL, past)
    return contexts


def keep_sums(past_key_values, contexts: dict[int, PrefixContext]) -> None:
    """Leave each layer's sums on the cache the forward returned, for the next step."""
    if past_key_values is not None and contexts:
        setattr(past_key_values, STORE, {layer: context.sums for layer, context in contexts.items()})


def reorder_sums(past_key_values, beam_idx: torch.Tensor) -> None:
    store = getattr(past_key_values, STORE, None)
    if store:
        reordered = {}
        for layer, (sums_BPH, counts_BP) in store.items():
            index = beam_idx.to(sums_BPH.device)
            reordered[layer] = (sums_BPH.index_select(0, index), counts_BP.index_select(0, index))
        setattr(past_key_values, STORE, reordered)
