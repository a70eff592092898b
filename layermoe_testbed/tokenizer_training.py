"""Training the testbed's SentencePiece tokenizer over old and new languages, saved so `AutoTokenizer.from_pretrained`
loads it (a user's run brings its model's own tokenizer)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from transformers import LlamaTokenizer

from layermoe_ds.data.loading import iter_documents, raw_sources
from layermoe_ds.errors import InputError

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def train_tokenizer(
    data: Path,
    langs: Sequence[str],
    out: Path,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    seed_sentences: int = 200_000,
    seed: int = 0,
) -> Path:
    """Train a byte-fallback SentencePiece model on the train split of `langs` and save an HF tokenizer to `out`.

    Every language contributes equally many characters (the largest language is subsampled by line order),
    so a new language is not split into bytes just because the old ones have more text. The text is streamed
    twice (counting, then writing SentencePiece's input file), never held in memory.
    """
    if model_type not in ("unigram", "bpe"):
        raise InputError(f"tokenizer.model_type: {model_type!r} must be 'unigram' or 'bpe'")
    if vocab_size < 300:
        raise InputError(f"tokenizer.vocab_size: {vocab_size} is too small (byte fallback alone needs 259)")
    raw_sources(data, langs, ["train"])  # every language's train split exists, before the first pass
    chars_per_lang = min(sum(map(len, iter_documents(data, lang, "train"))) for lang in langs)
    if chars_per_lang == 0:
        empty = [lang for lang in langs if next(iter_documents(data, lang, "train"), None) is None]
        raise InputError(f"data: language {empty[0]!r} has no text in its train split ({data})")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for lang in langs:
                used = 0
                for line in iter_documents(data, lang, "train"):
                    if used >= chars_per_lang:
                        break
                    f.write(line.replace("\n", " ") + "\n")
                    used += len(line)
        prefix = Path(tmp) / "spm"
        # Seeded sampling and one thread: the same data gives the same tokenizer on every machine (with several
        # threads the EM statistics are summed in a varying order and the pieces can differ).
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=True,
            num_threads=1,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=PAD,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            split_digits=True,
            minloglevel=2,
        )
        staging = Path(tmp) / "hf"
        staging.mkdir()
        shutil.copy(f"{prefix}.model", staging / "tokenizer.model")
        # LlamaTokenizer converts the SentencePiece model into a fast tokenizer.json on load.
        tokenizer = LlamaTokenizer.from_pretrained(staging, legacy=False, add_bos_token=False, add_eos_token=False)
        tokenizer.pad_token = PAD
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(staging)
        shutil.copytree(staging, out)
    log.info("tokenizer with %d pieces saved to %s", vocab_size, out)
    return out
