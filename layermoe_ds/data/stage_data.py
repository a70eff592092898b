"""The token blocks each training stage reads, labelled with the language *group* (0 = original).

Stage 1 reads the newest group's languages only. Stage 2 reads a review set: the first
`stage2_docs_per_old_lang` documents of every language of the earlier groups (replayed) and the first
`stage2_docs_per_new_lang` of every language of the newest group, found through the document index without
reading the rest.
"""

from __future__ import annotations

from pathlib import Path

from layermoe_ds.config import TrainConfig
from layermoe_ds.data.packing import BlockDataset, block_part
from layermoe_ds.data.streams import open_streams


def stage_blocks(config: TrainConfig, stage: int, tokenizer, tokenizer_dir: Path) -> BlockDataset:
    """Blocks for `stage`; each block's label is its language's group."""
    langs = config.new_langs if stage == 1 else [*config.old_langs, *config.new_langs]
    streams = open_streams(Path(config.data), tokenizer, tokenizer_dir, langs, "train")
    parts = []
    for lang, stream in streams.items():
        docs = config.stage2_docs_per_new_lang if lang in config.new_langs else config.stage2_docs_per_old_lang
        limit = None if stage == 1 else stream.documents_prefix(docs)[0]
        parts.append(block_part(lang, config.group_of(lang), stream, config.seq_len, limit))
    return BlockDataset(parts, config.seq_len)
