"""Tokenise documents and pack them into fixed-length blocks carrying a per-token language label.

Every block holds one language (its documents joined by EOS), so per-token labels are exact and a batch can mix
languages freely. Fixed-length blocks matter for DeepSpeed MoE: every rank must see the same token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBlocks:
    """`input_ids_NL` token blocks and `lang_ids_NL` indices into `langs`; `bytes_per_lang` counts UTF-8 bytes."""

    input_ids_NL: torch.Tensor
    lang_ids_NL: torch.Tensor
    langs: list[str]
    tokens_per_lang: dict[str, int]
    bytes_per_lang: dict[str, int]

    def __len__(self) -> int:
        return self.input_ids_NL.shape[0]


def token_stream(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[int]:
    """Documents joined as `doc EOS doc EOS …`, cut at `max_tokens` (None = all)."""
    stream: list[int] = []
    batch = 256
    for start in range(0, len(texts), batch):
        encoded = tokenizer(list(texts[start : start + batch]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


def pack_blocks(
    tokenizer,
    texts_per_lang: dict[str, Sequence[str]],
    seq_len: int,
    max_tokens_per_lang: int | None = None,
    lang_index: Sequence[str] | None = None,
) -> PackedBlocks:
    """Pack each language's stream into `seq_len` blocks; the trailing partial block is dropped.

    `lang_index` fixes the label numbering (default: the order of `texts_per_lang`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len: {seq_len} must be >= 2")
    langs = list(lang_index) if lang_index is not None else list(texts_per_lang)
    blocks, labels, tokens, nbytes = [], [], {}, {}
    for lang, texts in texts_per_lang.items():
        stream = token_stream(tokenizer, texts, max_tokens_per_lang)
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(f"data: language {lang!r} has {len(stream)} tokens, fewer than one block of {seq_len}")
        ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
        blocks.append(ids)
        labels.append(torch.full_like(ids, langs.index(lang)))
        tokens[lang] = n * seq_len
        nbytes[lang] = sum(len(t.encode("utf-8")) + 1 for t in texts)
    return PackedBlocks(torch.cat(blocks), torch.cat(labels), langs, tokens, nbytes)


class BlockSampler:
    """Seeded, resumable order over blocks: epoch-wise permutations, global batches split across ranks.

    `state_dict()` after n batches and `load_state_dict()` in a new process yield the same following batches.
    The last partial global batch of an epoch is dropped so every rank sees the same number of tokens.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > num_blocks:
            raise ValueError(
                f"batch_size: {batch_size} × world size {world_size} exceeds the {num_blocks} blocks of data"
            )
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_blocks, generator=generator)

    def next_indices(self) -> torch.Tensor:
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.num_blocks:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        start = self.cursor + self.rank * self.batch_size
        self.cursor += global_batch
        return self._perm[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_blocks"] != self.num_blocks:
            raise ValueError(
                f"sampler state is for seed {state['seed']} over {state['num_blocks']} blocks, "
                f"not seed {self.seed} over {self.num_blocks}: the data or seed changed since the checkpoint"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation()
