"""Tokenize raw text once into memory-mapped token shards (`layermoe data tokenize`), in parallel and in bounded
memory (`data/streams.py` prepares raw text for a run through a cache with the same code).

How it runs: every input file is cut into chunks of about `chunk_bytes` at line starts; each worker process streams
one chunk line by line, batch-encodes its documents and appends the ids to one shard per language and split,
hashing as it writes. A chunk is done when its shards sit under their final names and its record
`shards/chunk.<n>.json` is written (both atomic renames); a killed run is simply run again, reusing the done chunks
and discarding half-written `*.tmp` files. The manifest is written last, so a directory without one is never used.
Memory: a worker holds one batch of text and its chunk's document lengths; nothing grows with the corpus.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from layermoe_ds.data.loading import Source, iter_records, line_boundaries, raw_sources
from layermoe_ds.data.tokens import (
    FORMAT,
    MANIFEST,
    VERSION,
    PreparedData,
    TokenStream,
    chat_turn_eos,
    index_dtype,
    is_prepared,
    separator_id,
    token_dtype,
    document_bos,
    document_specials,
    tokenizer_fingerprint,
)
from layermoe_ds.io import read_json, sha256_file, write_json
from layermoe_ds.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

# `load_tokenizer` (transformers) is imported inside the two functions that need it: a spawned tokenizer worker
# imports this module, and with a fast tokenizer it starts without transformers (~0.1 s instead of ~2.5 s a worker).

CHUNK_BYTES = 32 << 20
BATCH_BYTES = 1 << 20  # text buffered per language before one batch-encode call
LANG_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Chunk:
    number: int
    path: str
    kind: str
    lang: str | None
    split: str | None
    start: int
    end: int

    @property
    def source(self) -> Source:
        return Source(Path(self.path), self.kind, self.lang, self.split)


def batch_encoder(tokenizer):
    """texts → token id lists, without special tokens: the fast tokenizer's own batch call when it has one
    (`encode_batch_fast` where the tokenizers library has it: the same ids, no character offsets computed)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _backend_encoder(backend)
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _backend_encoder(backend):
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

    def keeps(self, lang: str, split: str) -> bool:
        return (self.langs is None or lang in self.langs) and (self.splits is None or split in self.splits)


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
    for lang, split, text, nbytes in iter_records(chunk.source, chunk.start, chunk.end):
        seen.add(lang)
        if not selection.keeps(lang, split):
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
        "input_bytes": chunk.end - chunk.start,
        "languages": sorted(seen),
        "shards": {f"{lang}/{split}": w.finish() for (lang, split), w in writers.items()},
    }
    write_json(shards / f"chunk.{chunk.number:05d}.json", record)
    return record


_WORKER: dict = {}


def _init_worker(backend_spec: str | None, tokenizer_dir: str, specials: tuple[int | None, int]) -> None:
    """A worker gets the main process's exact tokenizer: a fast tokenizer's serialised backend (no transformers
    import, well under a second to start), else the directory loaded again."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a worker: the workers are the parallelism
    if backend_spec is not None:
        _WORKER.update(encode=_backend_encoder(Tokenizer.from_str(backend_spec)), specials=specials)
        return
    from layermoe_ds.data.tokenizer import load_tokenizer

    _WORKER.update(encode=batch_encoder(load_tokenizer(Path(tokenizer_dir))), specials=specials)


def _worker_task(chunk: Chunk, shards: str, dtype: str, selection: Selection) -> dict:
    return tokenize_chunk(chunk, Path(shards), _WORKER["encode"], _WORKER["specials"], np.dtype(dtype), selection)


def source_meta(source: Source) -> dict:
    stat = source.path.stat()
    return {
        "path": str(source.path.resolve()),
        "kind": source.kind,
        "lang": source.lang,
        "split": source.split,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def _done_record(shards: Path, chunk: Chunk) -> dict | None:
    """A finished chunk's record when its shards are all there at their recorded sizes, else None."""
    path = shards / f"chunk.{chunk.number:05d}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["chunk"] != asdict(chunk):
        return None
    for shard in record["shards"].values():
        if not (shards.parent / shard["bin"]).is_file() or not (shards.parent / shard["idx"]).is_file():
            return None
    return record


def tokenize(
    sources: Sequence[Source],
    tokenizer_dir: Path,
    out: Path,
    workers: int = 1,
    langs: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    tokenizer=None,
    progress: bool | None = None,
    doc_separator: str | None = None,
) -> dict:
    """Prepare `sources` into `out` (see the module docstring); returns the manifest. A directory that holds this
    exact input already is returned as it is; one that holds other input is refused. `doc_separator`: the token
    that ends each document instead of the tokenizer's EOS (an Instruct tokenizer's EOS ends chat turns)."""
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    if workers < 1:
        raise InputError(f"workers: {workers} must be >= 1")
    if chunk_bytes < 1:
        raise InputError(f"chunk_bytes: {chunk_bytes} must be >= 1")
    if tokenizer is None:
        from layermoe_ds.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    separator = None if doc_separator is None else separator_id(tokenizer, doc_separator)
    if separator is None and chat_turn_eos(tokenizer):
        log.warning(
            "the tokenizer's EOS %r ends the turns of its chat template (an Instruct model): documents will be "
            "separated by it, not by what pretraining used; --doc-separator chooses the separator (e.g. %r)",
            tokenizer.eos_token,
            tokenizer.unk_token or tokenizer.bos_token,
        )
    specials = document_specials(tokenizer, separator)
    plan = {
        "tokenizer": tokenizer_fingerprint(tokenizer, separator),
        "sources": [source_meta(s) for s in sources],
        "langs": sorted(langs) if langs is not None else None,
        "splits": sorted(splits) if splits is not None else None,
    }
    selection = Selection(plan["langs"] and tuple(plan["langs"]), plan["splits"] and tuple(plan["splits"]))
    if is_prepared(out):
        manifest = read_json(out / MANIFEST, "prepared data manifest")
        if manifest.get("plan") == plan:
            return {**manifest, "up_to_date": True}
        raise OutputExistsError(
            f"{out} holds tokens prepared from other input or with another tokenizer; use another --out or delete it"
        )
    shards = out / "shards"
    plan_file = shards / "plan.json"
    if plan_file.is_file() and read_json(plan_file, "tokenize plan").get("plan") != plan:
        shutil.rmtree(shards)  # a killed run over other input: nothing of it is reusable
    shards.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, {"plan": plan})
    for stale in shards.glob("*.tmp"):
        stale.unlink()

    dtype = token_dtype(len(tokenizer))
    ranges = [(s, start, end) for s in sources for start, end in line_boundaries(s.path, chunk_bytes)]
    chunks = [
        Chunk(n, str(s.path.resolve()), s.kind, s.lang, s.split, start, end) for n, (s, start, end) in enumerate(ranges)
    ]
    records = {c.number: r for c in chunks if (r := _done_record(shards, c)) is not None}
    pending = [c for c in chunks if c.number not in records]
    total_bytes = sum(c.end - c.start for c in pending)
    workers = min(workers, len(pending)) or 1
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(1) as hasher,  # source checksums beside the tokenizing (hashlib frees the GIL)
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=f"tokenize ({workers} workers)",
            disable=True if progress is False else None,
        ) as bar,
    ):
        checksums = hasher.submit(lambda: [sha256_file(s.path) for s in sources])
        for record in _run_chunks(pending, shards, tokenizer, tokenizer_dir, specials, dtype, selection, workers):
            records[record["chunk"]["number"]] = record
            bar.update(record["input_bytes"])
        source_sha = checksums.result()
    seconds = time.perf_counter() - started
    manifest = _manifest(out, plan, records, sources, source_sha, tokenizer, tokenizer_dir, dtype, langs)
    if separator is not None:
        manifest["tokenizer"]["doc_separator"] = {"token": doc_separator, "id": separator}
    manifest["run"] = {
        "workers": workers,
        "seconds": round(seconds, 3),
        "input_bytes": total_bytes,
        "mb_per_s": round(total_bytes / 1e6 / seconds, 3) if seconds > 0 and total_bytes else None,
    }
    write_json(out / MANIFEST, manifest)
    plan_file.unlink()
    return manifest


def _run_chunks(chunks, shards, tokenizer, tokenizer_dir, specials, dtype, selection, workers) -> Iterable[dict]:
    if workers == 1:  # in this process, with the tokenizer already loaded
        encode = batch_encoder(tokenizer)
        for chunk in chunks:
            yield tokenize_chunk(chunk, shards, encode, specials, dtype, selection)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else None
    with ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(spec, str(tokenizer_dir), specials),
    ) as pool:
        futures = [pool.submit(_worker_task, c, str(shards), dtype.str, selection) for c in chunks]
        for future in futures:  # in order: an error surfaces as the first failing chunk's
            yield future.result()


def _manifest(out, plan, records, sources, source_sha, tokenizer, tokenizer_dir, dtype, langs) -> dict:
    streams: dict[str, dict[str, dict]] = {}

    def new_entry(source_path: str) -> dict:
        return {"tokens": 0, "documents": 0, "bytes": 0, "source": source_path, "shards": []}

    for source in sources:  # a per-language file's stream exists even when the file holds no text
        if source.lang is not None:
            streams.setdefault(source.lang, {})[source.split] = new_entry(str(source.path))
    for number in sorted(records):
        for name, shard in records[number]["shards"].items():
            lang, split = name.split("/")
            entry = streams.setdefault(lang, {}).setdefault(split, new_entry(records[number]["chunk"]["path"]))
            for key in ("tokens", "documents", "bytes"):
                entry[key] += shard[key]
            entry["shards"].append({k: shard[k] for k in ("bin", "idx", "tokens", "documents", "sha256")})
    if langs is not None:
        missing = [lang for lang in langs if lang not in streams]
        if missing:
            where = ", ".join(str(s.path) for s in sources)
            seen = sorted({lang for r in records.values() for lang in r["languages"]})
            raise InputError(f"languages {missing} not found in {where}; found: {seen}")
    entries = [e for splits in streams.values() for e in splits.values()]
    disk = sum((out / s[k]).stat().st_size for e in entries for s in e["shards"] for k in ("bin", "idx"))
    tokens = sum(e["tokens"] for e in entries)
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.str,
        "tokenizer": {
            "name": str(tokenizer_dir),
            "fingerprint": plan["tokenizer"],
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": document_bos(tokenizer),  # each document's first token, or null: none
        },
        "plan": plan,
        "sources": [{**meta, "sha256": sha} for meta, sha in zip(plan["sources"], source_sha, strict=True)],
        "streams": streams,
        "totals": {
            "tokens": tokens,
            "documents": sum(e["documents"] for e in entries),
            "text_bytes": sum(e["bytes"] for e in entries),
            "disk_bytes": disk,
            "disk_bytes_per_token": round(disk / tokens, 4) if tokens else None,
        },
    }


def default_workers() -> int:
    if os.environ.get("LAYERMOE_DATA_WORKERS"):
        return int(os.environ["LAYERMOE_DATA_WORKERS"])
    return max(1, min(8, len(os.sched_getaffinity(0))))
