"""Layer-wise cross-language similarity of the experts' input (LayerMoE Eq. 8–9).

For languages a, b at layer i: S_ab^i = mean over token pairs of cos(a_p, b_q) = <mean(â), mean(b̂)>, â the unit-
normalised hidden states. So per layer and language we only keep Σ â and a count: O(layers × languages × hidden)
memory whatever the token count, sums reducible across ranks. Unit vectors and per-batch sums are computed in fp32,
accumulation across batches and the final inner products in fp64.

Shape letters (`layermoe_ds/__init__.py`): B profiled rows, L their length, T tokens, H hidden size, A languages,
N layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from layermoe_ds.data.tokens import TokenStream
from layermoe_ds.errors import InputError
from layermoe_ds.hf.load import ffn_modules

log = logging.getLogger(__name__)

SCORE_RULE = "T_i = 0.5 * (mean of new-new pairs + mean of new-old pairs)"
SCORE_RULE_SINGLE_NEW = "T_i = mean of new-old pairs (a single new language has no new-new pair)"


@dataclass
class ProfileBatches:
    """Token blocks to profile: `input_ids_BL`, `mask_BL` (1 = real token), `lang_B` index into `langs`."""

    input_ids_BL: torch.Tensor
    mask_BL: torch.Tensor
    lang_B: torch.Tensor
    langs: list[str]
    tokens: dict[str, int]


def profile_blocks(streams: dict[str, TokenStream], tokens_per_lang: int, seq_len: int, pad_id: int) -> ProfileBatches:
    """The first `tokens_per_lang` tokens of each language's stream, cut into `seq_len` rows; the last row
    right-padded with `pad_id`. Only those tokens are read."""
    rows, masks, lang_rows, tokens = [], [], [], {}
    langs = list(streams)
    for index, lang in enumerate(langs):
        stream = torch.from_numpy(streams[lang].read(0, min(tokens_per_lang, streams[lang].num_tokens)))
        tokens[lang] = len(stream)
        for start in range(0, len(stream), seq_len):
            piece = stream[start : start + seq_len]
            row = torch.full((seq_len,), pad_id, dtype=torch.long)
            mask = torch.zeros(seq_len, dtype=torch.long)
            row[: len(piece)], mask[: len(piece)] = piece, 1
            rows.append(row)
            masks.append(mask)
            lang_rows.append(index)
    return ProfileBatches(torch.stack(rows), torch.stack(masks), torch.tensor(lang_rows), langs, tokens)


class SimilarityAccumulator:
    """Per layer and language: Σ of unit-normalised hidden states (fp64) and the token count."""

    def __init__(self, num_layers: int, num_langs: int, hidden: int):
        self.sums_NAH = torch.zeros(num_layers, num_langs, hidden, dtype=torch.float64)
        self.counts_A = torch.zeros(num_langs, dtype=torch.float64)

    def add(self, layer: int, hidden_TH: torch.Tensor, lang_T: torch.Tensor) -> None:
        """Add tokens `hidden_TH` of languages `lang_T` (padding already removed) to layer `layer`."""
        unit_TH = F.normalize(hidden_TH.float(), dim=-1)
        per_lang_AH = torch.zeros(self.sums_NAH.shape[1:], dtype=torch.float32, device=unit_TH.device)
        per_lang_AH.index_add_(0, lang_T, unit_TH)
        self.sums_NAH[layer] += per_lang_AH.double().cpu()

    def count(self, lang_T: torch.Tensor) -> None:
        self.counts_A += torch.bincount(lang_T.cpu(), minlength=len(self.counts_A)).double()

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum over ranks when torch.distributed is initialised (each rank profiled a shard of the rows). The sums
        travel on `device`, the model's: NCCL reduces CUDA tensors only."""
        if dist.is_available() and dist.is_initialized():
            for name in ("sums_NAH", "counts_A"):
                total = getattr(self, name).to(device)
                dist.all_reduce(total)
                setattr(self, name, total.cpu())

    def matrix(self) -> torch.Tensor:
        """S[i, a, b] = <mean(â), mean(b̂)> for every layer i and language pair (fp64)."""
        if (self.counts_A == 0).any():
            raise InputError("similarity: a language has no profiled tokens")
        means_NAH = self.sums_NAH / self.counts_A[None, :, None]
        return torch.einsum("lah,lbh->lab", means_NAH, means_NAH)


@torch.no_grad()
def profile_model(
    model, batches: ProfileBatches, batch_size: int = 8, rank: int = 0, world_size: int = 1
) -> SimilarityAccumulator:
    """Run the model over `batches` (rows rank::world_size on this rank), hooking every FFN's input."""
    ffns = ffn_modules(model)
    hidden = model.config.get_text_config().hidden_size
    acc = SimilarityAccumulator(len(ffns), len(batches.langs), hidden)
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer_index: int):
        def hook(module, args, kwargs):
            hidden_BLH = args[0] if args else kwargs["hidden_states"]
            acc.add(layer_index, hidden_BLH[current["keep_BL"]], current["lang_T"])

        return hook

    handles = [ffn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, ffn in enumerate(ffns)]
    # The decoder stack alone: the LM head's logits are not needed to profile, so skip them when we can.
    body = getattr(model, "model", model)
    device = next(model.parameters()).device
    rows = torch.arange(rank, len(batches.input_ids_BL), world_size)
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="profile", disable=None if rank == 0 else True):
            index = rows[start : start + batch_size]
            ids, mask = batches.input_ids_BL[index].to(device), batches.mask_BL[index].to(device)
            keep_BL = mask.bool()
            lang_T = batches.lang_B[index].to(device)[:, None].expand_as(mask)[keep_BL]
            current.update(keep_BL=keep_BL, lang_T=lang_T)
            acc.count(lang_T)
            body(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    acc.all_reduce(device)
    return acc


def pair_names(old: Sequence[str], new: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """New–new pairs in the order of `new` and new–old pairs, each written once with the new language first."""
    new_new = [(a, b) for i, a in enumerate(new) for b in new[i + 1 :]]
    new_old = [(a, b) for a in new for b in old]
    return new_new, new_old


def layer_scores(pairs: dict[str, list[float]], old: Sequence[str], new: Sequence[str]) -> tuple[list[float], str]:
    """T_i from the per-pair curves (Eq. 9 as in the reference): ½(mean new–new + mean new–old)."""
    new_new, new_old = pair_names(old, new)
    missing = [f"{a}&{b}" for a, b in new_new + new_old if f"{a}&{b}" not in pairs]
    if missing:
        raise InputError(f"similarity: pairs {missing} are missing")
    num_layers = len(pairs[f"{new_old[0][0]}&{new_old[0][1]}"])

    def mean_curve(names):
        return [sum(pairs[f"{a}&{b}"][i] for a, b in names) / len(names) for i in range(num_layers)]

    cross = mean_curve(new_old)
    if not new_new:
        return cross, SCORE_RULE_SINGLE_NEW
    within = mean_curve(new_new)
    return [0.5 * (w + c) for w, c in zip(within, cross, strict=True)], SCORE_RULE


def similarity_report(
    acc: SimilarityAccumulator,
    langs: Sequence[str],
    old: Sequence[str],
    new: Sequence[str],
    tokens: dict[str, int],
    model_id: str,
    seed: int,
    extra: dict | None = None,
) -> dict:
    """The `similarity.json` document (schema in shared/DESIGN.md and the profile issue)."""
    matrix_NAA = acc.matrix()
    index = {lang: i for i, lang in enumerate(langs)}
    new_new, new_old = pair_names(old, new)
    pairs = {f"{a}&{b}": matrix_NAA[:, index[a], index[b]].tolist() for a, b in new_new + new_old}
    scores, rule = layer_scores(pairs, old, new)
    return {
        "model": model_id,
        "num_layers": matrix_NAA.shape[0],
        "old": list(old),
        "new": list(new),
        "tokens": dict(tokens),
        "pairs": pairs,
        "layer_score": scores,
        "score_rule": rule,
        "seed": seed,
        "matrix": {"langs": list(langs), "values": matrix_NAA.tolist()},
        "precision": "unit vectors and batch sums in fp32, accumulation and inner products in fp64",
        **(extra or {}),
    }
