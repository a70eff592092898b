"""Fixed-length training blocks over memory-mapped token streams, each block of one language, and their sampler.

A language's stream is `doc EOS doc EOS …` (data/tokens.py); its blocks are consecutive `seq_len` windows of it,
the trailing partial block dropped, so every rank sees the same token count (DeepSpeed MoE needs that). A block's
language is known from which stream it is in: no label is stored per token, and nothing is read until a batch asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from layermoe_ds.data.tokens import TokenStream
from layermoe_ds.errors import InputError


@dataclass(frozen=True)
class BlockPart:
    """The first `blocks` blocks of `stream`, labelled `label` (a language or group index)."""

    lang: str
    label: int
    stream: TokenStream
    blocks: int


class BlockDataset:
    """Blocks of several languages end to end: part 0's blocks, then part 1's, … (the sampler's index space)."""

    def __init__(self, parts: Sequence[BlockPart], seq_len: int):
        self.parts, self.seq_len = list(parts), seq_len
        self._ends = np.cumsum([p.blocks for p in self.parts], dtype=np.int64)
        self.tokens_per_lang = {p.lang: p.blocks * seq_len for p in self.parts}

    def __len__(self) -> int:
        return int(self._ends[-1]) if self.parts else 0

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`input_ids_BL`, `labels_B`) of the blocks at `indices`, read from the mapped shards."""
        which = np.searchsorted(self._ends, indices.numpy(), side="right")
        rows, labels = [], []
        for index, part_no in zip(indices.tolist(), which.tolist(), strict=True):
            part = self.parts[part_no]
            local = index - int(self._ends[part_no] - part.blocks)
            rows.append(part.stream.read(local * self.seq_len, (local + 1) * self.seq_len))
            labels.append(part.label)
        return torch.from_numpy(np.stack(rows)), torch.tensor(labels, dtype=torch.long)


def block_part(lang: str, label: int, stream: TokenStream, seq_len: int, max_tokens: int | None = None) -> BlockPart:
    """`stream`'s blocks of `seq_len` (of its first `max_tokens` tokens when given); too little text is an error."""
    if seq_len < 2:
        raise InputError(f"seq_len: {seq_len} must be >= 2")
    tokens = stream.num_tokens if max_tokens is None else min(max_tokens, stream.num_tokens)
    if tokens < seq_len:
        raise InputError(f"data: language {lang!r} has {tokens} tokens, fewer than one block of {seq_len}")
    return BlockPart(lang, label, stream, tokens // seq_len)


class BlockSampler:
    """Seeded, resumable order over blocks: epoch-wise permutations, global batches split across ranks.

    `state_dict()` after n batches and `load_state_dict()` in a new process yield the same following batches.
    The last partial global batch of an epoch is dropped so every rank sees the same number of tokens.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > num_blocks:
            raise InputError(
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
            raise InputError(
                f"sampler state is for seed {state['seed']} over {state['num_blocks']} blocks, "
                f"not seed {self.seed} over {self.num_blocks}: the data or seed changed since the checkpoint"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation()
