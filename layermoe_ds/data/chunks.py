"""One chunk of `data tokenize`'s work, in a worker: read its documents, choose which it takes and where
(`Selection`: the languages and splits asked for, a budget's sample, held-out carving), tokenize them in batches and
stream them to one shard per language and split; or, for a budget's first pass, hash them (`scan_chunk`)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from array import array
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from layermoe_ds.data.loading import Source, iter_records
from layermoe_ds.data.sampling import doc_hash, holdout_split
from layermoe_ds.data.tokens import index_dtype
from layermoe_ds.errors import InputError
from layermoe_ds.io import write_json

BATCH_BYTES = 1 << 20  # text buffered per language before one batch-encode call
LANG_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Chunk:
    """A worker's share of one source: a byte range of plain lines, a row-group range of Parquet, or a whole file."""

    number: int
    path: str
    kind: str
    lang: str | None
    split: str | None
    start: int
    end: int
    compression: str | None = None
    text_field: str = "text"
    lang_field: str | None = None
    unsplit: bool = False
    lang_map: str = ""
    weight: int = 0  # the input bytes it covers (uncompressed for Parquet): progress and throughput

    @classmethod
    def of(cls, number: int, source: Source, start: int, end: int, weight: int) -> Chunk:
        fields = {k: v for k, v in asdict(source).items() if k != "path"}
        return cls(number, str(Path(source.path).resolve()), start=start, end=end, weight=weight, **fields)

    @property
    def source(self) -> Source:
        skip = ("number", "path", "start", "end", "weight")
        return Source(Path(self.path), **{k: v for k, v in asdict(self).items() if k not in skip})


def batch_encoder(tokenizer):
    """texts → token id lists, without special tokens: the fast tokenizer's own batch call when it has one
    (`encode_batch_fast` where the tokenizers library has it: the same ids, no character offsets computed)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend_encoder(backend)
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def backend_encoder(backend):
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


class _ShardWriter:
    """The tokens of one language and split of one chunk, streamed to `<name>.bin.tmp`, index kept as lengths."""

    def __init__(self, shards: Path, name: str, dtype: np.dtype):
        self.shards, self.name, self.dtype = shards, name, dtype
        self.tmp = shards / f"{name}.bin.tmp"
        self.file = open(self.tmp, "wb")
        self.digest = hashlib.sha256()
        self.lengths, self.nbytes = array("Q"), array("Q")

    def add(self, encoded: list[list[int]], nbytes: list[int], specials: tuple[int | None, int]) -> None:
        bos, eos = specials
        start = [] if bos is None else [bos]
        flat: list[int] = []
        for ids in encoded:
            flat.extend(start)
            flat.extend(ids)
            flat.append(eos)
            self.lengths.append(len(start) + len(ids) + 1)
        self.nbytes.extend(nbytes)
        data = np.array(flat, dtype=self.dtype).tobytes()
        self.digest.update(data)
        self.file.write(data)

    def finish(self) -> dict:
        self.file.close()
        lengths = np.frombuffer(self.lengths, dtype=np.uint64)
        nbytes = np.frombuffer(self.nbytes, dtype=np.uint64)
        index = np.zeros(len(lengths), dtype=index_dtype(int(lengths.max()), int(nbytes.max())))
        index["tokens"], index["bytes"] = lengths, nbytes
        buffer = io.BytesIO()
        np.save(buffer, index)
        idx_tmp = self.shards / f"{self.name}.idx.npy.tmp"
        idx_tmp.write_bytes(buffer.getvalue())
        os.replace(self.tmp, self.shards / f"{self.name}.bin")
        os.replace(idx_tmp, self.shards / f"{self.name}.idx.npy")
        return {
            "bin": f"shards/{self.name}.bin",
            "idx": f"shards/{self.name}.idx.npy",
            "tokens": int(lengths.sum()),
            "documents": len(lengths),
            "bytes": int(nbytes.sum()),
            "sha256": self.digest.hexdigest(),
        }


@dataclass(frozen=True)
class Selection:
    """Which records of a mixed jsonl to keep (None: all); per-language files are selected by file instead."""

    langs: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None
    thresholds: tuple[tuple[str, int], ...] = ()  # language → the largest sample hash a budget keeps
    heldout: tuple[str, ...] = ()  # languages with held-out text of their own (never carved)
    holdout_fraction: float = 0.0  # valid and test, each, carved from a language's unsplit text
    seed: int = 0

    def keeps(self, lang: str, split: str) -> bool:
        return (self.langs is None or lang in self.langs) and (self.splits is None or split in self.splits)

    @cached_property
    def cuts(self) -> dict[str, int]:
        return dict(self.thresholds)

    def place(self, source: Source, lang: str, split: str, text: str) -> str | None:
        """The split a document goes to, or None when it is not taken: a budget's sample, then held-out carving,
        both by hashes of the text (data/sampling.py)."""
        if split == "train":
            cut = self.cuts.get(lang)
            if cut is not None and doc_hash(text, self.seed) > cut:
                return None
            if source.unsplit and self.holdout_fraction and lang not in self.heldout:
                split = holdout_split(text, self.seed, self.holdout_fraction)
        return split if self.keeps(lang, split) else None


def tokenize_chunk(
    chunk: Chunk, shards: Path, encode, specials: tuple[int | None, int], dtype: np.dtype, selection: Selection
) -> dict:
    """Tokenize one chunk into its shards and write its record; returns the record."""
    writers: dict[tuple[str, str], _ShardWriter] = {}
    buffers: dict[tuple[str, str], tuple[list[str], list[int]]] = {}
    buffered: dict[tuple[str, str], int] = {}

    def flush(key):
        texts, nbytes = buffers.pop(key)
        buffered.pop(key)
        writers[key].add(encode(texts), nbytes, specials)

    seen: set[str] = set()
    source = chunk.source
    for lang, given, text, nbytes in iter_records(source, chunk.start, chunk.end):
        seen.add(lang)
        split = selection.place(source, lang, given, text)
        if split is None:
            continue
        key = (lang, split)
        if key not in writers:
            if not LANG_NAME.match(lang):
                raise InputError(f"{chunk.path}: language {lang!r} is not a name of letters, digits, '_' or '-'")
            writers[key] = _ShardWriter(shards, f"{lang}.{split}.{chunk.number:05d}", dtype)
        texts, sizes = buffers.setdefault(key, ([], []))
        texts.append(text)
        sizes.append(nbytes)
        buffered[key] = buffered.get(key, 0) + nbytes
        if buffered[key] >= BATCH_BYTES:
            flush(key)
    for key in list(buffers):
        flush(key)
    record = {
        "chunk": asdict(chunk),
        "input_bytes": chunk.weight,
        "languages": sorted(seen),
        "shards": {f"{lang}/{split}": w.finish() for (lang, split), w in writers.items()},
    }
    write_json(shards / f"chunk.{chunk.number:05d}.json", record)
    return record


def scan_chunk(chunk: Chunk, encode, langs: tuple[str, ...], sample_cuts: dict[str, int], seed: int) -> dict:
    """A budget's first pass over one chunk: per language of `langs`, the (hash, bytes, tokens) of its training
    documents; tokens are counted only where the hash is below the language's sample cut (else −1)."""
    found: dict[str, tuple[list[int], list[int], list[int]]] = {lang: ([], [], []) for lang in langs}
    measured: dict[str, list[tuple[int, str]]] = {lang: [] for lang in langs}
    for lang, split, text, nbytes in iter_records(chunk.source, chunk.start, chunk.end):
        if split != "train" or lang not in found:
            continue
        hashes, sizes, tokens = found[lang]
        value = doc_hash(text, seed)
        if value < sample_cuts.get(lang, 0):
            measured[lang].append((len(tokens), text))
        hashes.append(value)
        sizes.append(nbytes)
        tokens.append(-1)
    for lang, texts in measured.items():
        if texts:
            for (i, _), ids in zip(texts, encode([t for _, t in texts]), strict=True):
                found[lang][2][i] = len(ids) + 1  # the separator counts, as in the shards
    return found
