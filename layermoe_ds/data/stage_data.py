"""The token blocks each training stage reads, labelled with the language *group* (0 = original).

Stage 1 reads the newest group's languages only. Stage 2 reads a review set: the first
`stage2_docs_per_old_lang` documents of every language of the earlier groups (replayed) and the first
`stage2_docs_per_new_lang` of every language of the newest group, found through the document index without
reading the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.data.packing import BlockDataset, block_part
from layermoe_ds.data.streams import open_streams


@dataclass(frozen=True)
class StageData:
    """What a stage's blocks are made of: the data (prepared or raw), the language groups (the last one is taught),
    the block length and stage 2's review mix, in documents per language."""

    data: Path
    language_groups: tuple[tuple[str, ...], ...]
    seq_len: int
    review_docs_old: int
    review_docs_new: int

    @classmethod
    def of(cls, config) -> StageData:
        """A run's (a TrainConfig's) data settings."""
        groups = tuple(tuple(group) for group in config.language_groups)
        return cls(Path(config.data), groups, config.seq_len, config.stage2_docs_per_old_lang,
                   config.stage2_docs_per_new_lang)  # fmt: skip

    @property
    def new_langs(self) -> Sequence[str]:
        return self.language_groups[-1]

    def group_of(self, lang: str) -> int:
        return next(i for i, group in enumerate(self.language_groups) if lang in group)


def stage_blocks(data: StageData, stage: int, tokenizer, tokenizer_dir: Path) -> BlockDataset:
    """Blocks for `stage`; each block's label is its language's group."""
    old = [lang for group in data.language_groups[:-1] for lang in group]
    langs = list(data.new_langs) if stage == 1 else [*old, *data.new_langs]
    streams = open_streams(data.data, tokenizer, tokenizer_dir, langs, "train")
    parts = []
    for lang, stream in streams.items():
        docs = data.review_docs_new if lang in data.new_langs else data.review_docs_old
        limit = None if stage == 1 else stream.documents_prefix(docs)[0]
        parts.append(block_part(lang, data.group_of(lang), stream, data.seq_len, limit))
    return BlockDataset(parts, data.seq_len)
