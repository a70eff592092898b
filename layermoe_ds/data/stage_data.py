"""The token blocks each training stage reads, labelled per token with the language *group* (0 = original).

Stage 1 reads the newest group's languages only. Stage 2 reads a balanced review set: the first
`stage2_docs_per_lang` documents of every language of every group (old languages are replayed, new ones kept).
"""

from __future__ import annotations

from pathlib import Path

import torch

from layermoe_ds.config import TrainConfig
from layermoe_ds.data.loading import load_texts
from layermoe_ds.data.packing import PackedBlocks, pack_blocks


def stage_blocks(config: TrainConfig, stage: int, tokenizer) -> PackedBlocks:
    """Blocks for `stage`; `lang_ids_NL` holds each token's language group (not its language)."""
    if stage == 1:
        texts = load_texts(Path(config.data), config.new_langs, "train")
    else:
        langs = [*config.old_langs, *config.new_langs]
        texts = {lang: docs[: config.stage2_docs_per_lang]
                 for lang, docs in load_texts(Path(config.data), langs, "train").items()}
    blocks = pack_blocks(tokenizer, texts, config.seq_len)
    group_of_lang = torch.tensor([config.group_of(lang) for lang in blocks.langs])
    return PackedBlocks(blocks.input_ids_NL, group_of_lang[blocks.lang_ids_NL], blocks.langs,
                        blocks.tokens_per_lang, blocks.bytes_per_lang)
