"""Per-language held-out loss, perplexity and bits per byte of a causal LM.

Every token of a language's stream `EOS doc EOS doc EOS …` is predicted exactly once: windows of `seq_len + 1`
tokens overlap by one token. Bits per byte divide the summed NLL by the text's UTF-8 bytes (one per separator),
so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from layermoe_ds.data.tokens import TokenStream, document_bos
from layermoe_ds.modeling.lm_loss import IGNORE_INDEX, model_nll


@torch.no_grad()
def language_nll(
    model,
    tokenizer,
    stream: TokenStream,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    after_forward: Callable[[torch.Tensor], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Summed NLL (nats) and counts over one language's documents; `max_tokens` cuts at the first whole document
    that reaches it (and counts that prefix's bytes). `after_forward(valid_T)` runs after each batch with the
    flattened mask of the input positions that are scored. With `world_size` > 1 this rank scores every
    world_size-th batch of windows (its partial sums: add them over ranks)."""
    kept, nbytes = stream.documents_covering(max_tokens)
    eos_1 = torch.tensor([tokenizer.eos_token_id if stream.separator is None else stream.separator])
    bos = document_bos(tokenizer)

    def window(start: int) -> torch.Tensor:  # positions [start, start + seq_len + 1) of `EOS + the kept tokens`
        piece = torch.from_numpy(stream.read(max(start - 1, 0), min(start + seq_len, kept)))
        return torch.cat([eos_1, piece]) if start == 0 else piece

    starts = list(range(0, kept, seq_len))  # the scored stream is kept + 1 tokens long
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(rank * batch_size, len(starts), world_size * batch_size):
        chunk = [window(s) for s in starts[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, c in enumerate(chunk):
            ids[row, : len(c)], mask[row, : len(c)] = c, 1
        ids, mask = ids.to(device), mask.to(device)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        if bos is not None:  # a document's BOS is given, not predicted: not scored
            targets = targets.masked_fill(targets == bos, IGNORE_INDEX)
        nll += model_nll(model, ids[:, :-1], mask[:, :-1], targets).item()  # no [tokens × vocabulary] logits
        if after_forward is not None:
            after_forward(mask[:, 1:].reshape(-1).bool())  # input positions that predict a real token
        count += int((targets != IGNORE_INDEX).sum())
    return {"nll": nll, "tokens": count, "bytes": nbytes}


def summarise(stats: dict[str, float]) -> dict[str, float]:
    loss = stats["nll"] / stats["tokens"]
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": stats["nll"] / math.log(2) / stats["bytes"],
        "tokens": stats["tokens"],
        "bytes": stats["bytes"],
    }


def evaluate_languages(
    model,
    tokenizer,
    streams: dict[str, TokenStream],
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    routing=None,
) -> dict[str, dict[str, float]]:
    """Per-language loss, perplexity and bits per byte; `routing` (a RoutingStats) also records each language's
    routing on a LayerMoE model. Under torch.distributed the ranks share the windows and add their sums (on the
    model's device, as NCCL needs); every rank returns the whole result."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for lang, stream in tqdm(streams.items(), desc="evaluate", disable=None if rank == 0 else True):
        hook = None if routing is None else (lambda valid, lang=lang: routing.update(model, lang, valid))
        stats = language_nll(model, tokenizer, stream, seq_len, batch_size, max_tokens, hook, rank, world)
        if distributed:
            sums = torch.tensor([stats["nll"], stats["tokens"]], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            stats.update(nll=float(sums[0]), tokens=int(sums[1]))
        out[lang] = summarise(stats)
    if routing is not None:
        routing.all_reduce(device)
    model.train(was_training)
    return out


def group_averages(results: dict[str, dict[str, float]], old: Sequence[str], new: Sequence[str]) -> dict:
    """Old-avg and New-avg of loss and bits per byte (plain means over languages, as in the papers)."""
    out = {}
    for name, langs in (("old_avg", old), ("new_avg", new)):
        langs = [lang for lang in langs if lang in results]
        if langs:
            out[name] = {k: sum(results[lang][k] for lang in langs) / len(langs) for k in ("loss", "bpb")}
    return out


def format_table(results: dict[str, dict[str, float]], old: Sequence[str], new: Sequence[str]) -> str:
    lines = [f"{'lang':<8} {'group':<5} {'tokens':>8} {'loss':>7} {'ppl':>9} {'bits/byte':>9}"]
    for lang, r in results.items():
        group = "old" if lang in old else ("new" if lang in new else "-")
        lines.append(f"{lang:<8} {group:<5} {r['tokens']:>8d} {r['loss']:>7.3f} {r['ppl']:>9.1f} {r['bpb']:>9.3f}")
    for name, avg in group_averages(results, old, new).items():
        lines.append(f"{name:<8} {'':<5} {'':>8} {avg['loss']:>7.3f} {'':>9} {avg['bpb']:>9.3f}")
    return "\n".join(lines)
