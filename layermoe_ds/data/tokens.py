"""Prepared token data: memory-mapped token shards with a document index, and the manifest that describes them.

Format (one directory, `layermoe data tokenize` writes it, data/prepare.py explains how):

    token_manifest.json                    format, tokenizer fingerprint, sources (size, SHA-256), every stream
    shards/<lang>.<split>.<chunk>.bin      raw token ids, little-endian uint16 (vocabulary ≤ 65,536) or uint32:
                                           `doc EOS doc EOS …` (`BOS doc EOS …` for a tokenizer that starts every
                                           sequence with a BOS), the documents of one input chunk in file order
    shards/<lang>.<split>.<chunk>.idx.npy  one row per document: (tokens incl. its BOS and EOS, UTF-8 bytes),
                                           each field in the smallest unsigned type that holds the shard's values

Why this format: nanoGPT's and OLMo-core's flat token arrays are the simplest thing numpy can memory-map, and
training only ever needs token positions (a block is `seq_len` consecutive tokens of one language's stream);
per-document lengths rather than Megatron's 8-byte pointers keep the index at 2–8 bytes a document, and the byte
counts give bits per byte without the text. One file per input chunk lets workers write in parallel, and the
stream of a language is its shards in chunk order: the same tokens whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.io import read_json, sha256_file

MANIFEST = "token_manifest.json"
FORMAT = "layermoe-tokens"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def index_dtype(max_tokens: int, max_bytes: int) -> np.dtype:
    """The document index's row type: each field the smallest unsigned type for the shard's largest value."""

    def smallest(value: int) -> str:
        return next(t for t in ("<u1", "<u2", "<u4", "<u8") if value < 1 << (8 * int(t[-1])))

    return np.dtype([("tokens", smallest(max_tokens)), ("bytes", smallest(max_bytes))])


def document_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every sequence with one (Llama-3, Gemma), None when it adds none (Qwen):
    documents are stored as the model saw them in pretraining, `[BOS] doc EOS`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_specials[:1] == [bos] and without[:1] != [bos] else None


def document_specials(tokenizer, separator: int | None = None) -> tuple[int | None, int]:
    """(BOS each document starts with or None, the token that ends it: `separator`, or the EOS)."""
    return document_bos(tokenizer), tokenizer.eos_token_id if separator is None else separator


def separator_id(tokenizer, token: str) -> int:
    """The id of `token`, which must be one token of the tokenizer's vocabulary (`--doc-separator`)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = tokenizer.unk_token_id
    if not ids or ids[0] is None or (ids[0] == unk and token != tokenizer.unk_token):
        specials = ", ".join(tokenizer.all_special_tokens)
        raise InputError(f"--doc-separator: {token!r} is not a token of this tokenizer; its special tokens: {specials}")
    return int(ids[0])


def chat_turn_eos(tokenizer) -> bool:
    """Whether the EOS token ends chat turns in the tokenizer's chat template (Instruct models): then it is not
    what pretraining separated documents with."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(tokenizer.eos_token) and tokenizer.eos_token in template


def tokenizer_fingerprint(tokenizer, separator: int | None = None) -> str:
    """What decides the token ids: a fast tokenizer's full serialisation (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens), its EOS id and whether each document starts with a BOS; two copies of one
    tokenizer share it wherever they are saved, and a changed convention changes it (cached shards are remade)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is what we can see
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    text = f"{type(tokenizer).__name__}\n{tokenizer.eos_token_id}\n{spec}"
    bos = document_bos(tokenizer)
    if bos is not None:  # (no BOS: the fingerprint data prepared before BOS was recorded has)
        text += f"\nbos {bos}"
    if separator is not None and separator != tokenizer.eos_token_id:  # (the EOS: the fingerprint it always had)
        text += f"\nseparator {separator}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_prepared(data: Path) -> bool:
    return (Path(data) / MANIFEST).is_file()


@dataclass
class Shard:
    """One `.bin` + `.idx.npy` pair; opened lazily, checked against the manifest when opened."""

    bin_path: Path
    idx_path: Path
    tokens: int
    documents: int
    dtype: np.dtype
    # How many tokens have been read from this shard: the tests count what a run materialises.
    tokens_read: int = field(default=0, compare=False)

    def check(self) -> None:
        """Both files there, the tokens at the manifest's size (a stat each: cheap enough for every open)."""
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise MissingInputError(f"{path}: missing shard file; run `layermoe data tokenize` again")
        size = self.bin_path.stat().st_size
        if size != self.tokens * self.dtype.itemsize:
            raise InputError(
                f"{self.bin_path}: {size} bytes, the manifest says {self.tokens * self.dtype.itemsize} "
                f"({self.tokens} tokens): truncated or replaced; run `layermoe data tokenize` again"
            )

    @cached_property
    def ids(self) -> np.memmap:
        self.check()
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    @cached_property
    def index(self) -> np.ndarray:
        try:
            index = np.load(self.idx_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{self.idx_path}: unreadable document index ({exc}); run `layermoe data tokenize` again"
            ) from exc
        if index.shape != (self.documents,) or index.dtype.names != ("tokens", "bytes"):
            raise InputError(
                f"{self.idx_path}: document index of shape {index.shape}, the manifest says {self.documents} "
                "documents: corrupt; run `layermoe data tokenize` again"
            )
        return index

    def read(self, start: int, stop: int) -> np.ndarray:
        self.tokens_read += stop - start
        return np.asarray(self.ids[start:stop])


class TokenStream:
    """One language and split: the tokens `doc EOS doc EOS …` over its shards in order, with the document index.

    Nothing is read until asked for; `read(start, stop)` maps only the shards it touches."""

    def __init__(self, name: str, shards: list[Shard], vocab_size: int, num_bytes: int, separator: int | None = None):
        self.name, self.shards, self.vocab_size, self.num_bytes = name, shards, vocab_size, num_bytes
        self.separator = separator  # the token between documents when it is not the tokenizer's EOS
        self._ends = np.cumsum([s.tokens for s in shards], dtype=np.int64)
        self.num_tokens = int(self._ends[-1]) if shards else 0
        self.num_documents = sum(s.documents for s in shards)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, checked against the vocabulary (a corrupt shard names itself)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"{self.name}: tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        pieces = []
        first = int(np.searchsorted(self._ends, start, side="right"))
        for i in range(first, len(self.shards)):
            shard_start = int(self._ends[i] - self.shards[i].tokens)
            if shard_start >= stop:
                break
            lo, hi = max(start, shard_start) - shard_start, min(stop, int(self._ends[i])) - shard_start
            piece = self.shards[i].read(lo, hi)
            if piece.size and int(piece.max()) >= self.vocab_size:
                raise InputError(
                    f"{self.shards[i].bin_path}: token id {int(piece.max())} >= the vocabulary size {self.vocab_size}: "
                    "corrupt; run `layermoe data tokenize` again"
                )
            pieces.append(piece)
        out = np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
        return out.astype(np.int64)

    def document_lengths(self, max_documents: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens incl. EOS, UTF-8 bytes) of the first `max_documents` documents (all by default), in order;
        only the index rows needed are read."""
        tokens, nbytes, left = [], [], self.num_documents if max_documents is None else max_documents
        for shard in self.shards:
            if left <= 0:
                break
            rows = shard.index[: min(left, shard.documents)]
            tokens.append(rows["tokens"].astype(np.int64))
            nbytes.append(rows["bytes"].astype(np.int64))
            left -= len(rows)
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(tokens), np.concatenate(nbytes)

    def documents_prefix(self, max_documents: int) -> tuple[int, int]:
        """(tokens, text bytes incl. one per separator) of the first `max_documents` documents."""
        tokens, nbytes = self.document_lengths(max_documents)
        return int(tokens.sum()), int(nbytes.sum() + len(nbytes))

    def documents_covering(self, max_tokens: int | None) -> tuple[int, int]:
        """(tokens, bytes incl. separators) of the shortest prefix of whole documents holding ≥ `max_tokens` tokens
        (every document when None or when there are fewer): evaluation's cut, in whole documents."""
        if max_tokens is None or max_tokens >= self.num_tokens:
            tokens, nbytes = self.document_lengths()
            return self.num_tokens, int(nbytes.sum() + len(nbytes))
        kept_tokens, kept_bytes, kept_docs = 0, 0, 0
        for shard in self.shards:  # index rows shard by shard until the cut
            rows = shard.index
            cum = np.cumsum(rows["tokens"], dtype=np.int64) + kept_tokens
            if cum.size and cum[-1] >= max_tokens:
                n = int(np.searchsorted(cum, max_tokens, side="left")) + 1
                kept_bytes += int(rows["bytes"][:n].astype(np.int64).sum())
                return int(cum[n - 1]), kept_bytes + kept_docs + n
            kept_tokens = int(cum[-1]) if cum.size else kept_tokens
            kept_bytes += int(rows["bytes"].astype(np.int64).sum())
            kept_docs += shard.documents
        return kept_tokens, kept_bytes + kept_docs

    @property
    def tokens_read(self) -> int:
        return sum(s.tokens_read for s in self.shards)


class PreparedData:
    """A prepared directory (or a cache entry): its manifest, checked, and a TokenStream per language and split."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = read_json(self.directory / MANIFEST, "prepared data manifest")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise InputError(
                f"{self.directory / MANIFEST}: not a layermoe token manifest of version {VERSION} "
                f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
            )
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["tokenizer"]["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def separator(self) -> int | None:
        """The document separator's id when `--doc-separator` chose one, else None (the tokenizer's EOS)."""
        chosen = self.manifest["tokenizer"].get("doc_separator")
        return None if chosen is None else chosen["id"]

    def languages(self) -> dict[str, list[str]]:
        return {lang: sorted(splits) for lang, splits in self.manifest["streams"].items()}

    def check_tokenizer(self, tokenizer, tokenizer_name: str) -> None:
        fingerprint = tokenizer_fingerprint(tokenizer, self.separator)
        if fingerprint != self.fingerprint:
            raise InputError(
                f"data: {self.directory} was tokenized with another tokenizer ({self.manifest['tokenizer']['name']}, "
                f"fingerprint {self.fingerprint}) than this run's ({tokenizer_name}, {fingerprint}); "
                f"run `layermoe data tokenize --tokenizer {tokenizer_name}` on the raw text"
            )

    def stream(self, lang: str, split: str) -> TokenStream:
        streams = self.manifest["streams"]
        if lang not in streams:
            raise InputError(f"languages [{lang!r}] not found in {self.directory}; found: {sorted(streams)}")
        if split not in streams[lang]:
            raise MissingInputError(f"data: no {split} split for language {lang!r} in {self.directory}")
        entry = streams[lang][split]
        shards = [
            Shard(self.directory / s["bin"], self.directory / s["idx"], s["tokens"], s["documents"], self.dtype)
            for s in entry["shards"]
        ]
        for shard in shards:
            shard.check()
        num_bytes = entry["bytes"] + entry["documents"]
        stream = TokenStream(f"{lang}/{split}", shards, self.vocab_size, num_bytes, self.separator)
        if stream.num_documents == 0:
            raise InputError(f"data: language {lang!r} has no text in its {split} split ({entry['source']})")
        return stream


def describe_manifest(manifest: dict, out: Path) -> str:
    """What `layermoe data tokenize` prints: documents and tokens per language and split, then the totals."""
    lines = [
        f"{lang:<8} {split:<6} {entry['documents']:>9} documents {entry['tokens']:>12} tokens"
        for lang, splits in sorted(manifest["streams"].items())
        for split, entry in sorted(splits.items())
    ]
    totals, run = manifest["totals"], manifest["run"]
    speed = f"{run['mb_per_s']:.2f} MB/s with {run['workers']} workers" if run.get("mb_per_s") else "nothing to do"
    if manifest.get("up_to_date"):
        speed = "up to date, nothing to do"
    lines.append(
        f"{totals['tokens']} tokens ({manifest['dtype']}), {totals['disk_bytes'] / 1e6:.1f} MB on disk "
        f"({totals['disk_bytes_per_token']} bytes a token with the index); {speed}; manifest: "
        f"{Path(out) / 'token_manifest.json'}"
    )
    return "\n".join(lines)


def verify(directory: Path) -> int:
    """Check every shard of a prepared directory against its manifest (sizes, SHA-256, index); returns the shard
    count. The first bad file is a one-line error naming it."""
    prepared = PreparedData(directory)
    count = 0
    for lang, splits in prepared.manifest["streams"].items():
        for split, entry in splits.items():
            stream = prepared.stream(lang, split)
            for shard, meta in zip(stream.shards, entry["shards"], strict=True):
                shard.ids  # noqa: B018  (size check)
                index = shard.index
                if int(index["tokens"].astype(np.int64).sum()) != shard.tokens:
                    raise InputError(f"{shard.idx_path}: document lengths do not add up to the shard's tokens")
                if sha256_file(shard.bin_path) != meta["sha256"]:
                    raise InputError(f"{shard.bin_path}: SHA-256 differs from the manifest: corrupt")
                count += 1
    return count
