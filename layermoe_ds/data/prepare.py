"""Tokenize raw text once into memory-mapped token shards (`layermoe data tokenize`), in parallel and in bounded
memory (`data/streams.py` prepares raw text for a run through a cache with the same code).

How it runs: every input file is cut into chunks of about `chunk_bytes` (plain text at line starts, Parquet by row
groups, a compressed or Arrow file whole); each worker process streams one chunk (data/chunks.py), batch-encodes its
documents and appends the ids to one shard per language and split, hashing as it writes. A chunk is done when its
shards sit under their final names and its record `shards/chunk.<n>.json` is written (both atomic renames); a killed
run is simply run again, reusing the done chunks and discarding half-written `*.tmp` files. The manifest is written
last, so a directory without one is never used.
Memory: a worker holds one batch of text and its chunk's document lengths; nothing grows with the corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from layermoe_ds.data.chunks import (
    Chunk,
    Selection,
    backend_encoder,
    batch_encoder,
    scan_chunk,
    tokenize_chunk,
)
from layermoe_ds.data.loading import Source, chunk_ranges
from layermoe_ds.data.sampling import MAX_BYTES_PER_TOKEN, RATIO_SAMPLE_BYTES, Budget, Candidates, cut_for
from layermoe_ds.data.tokens import (
    FORMAT,
    MANIFEST,
    VERSION,
    chat_turn_eos,
    document_bos,
    document_specials,
    is_prepared,
    separator_id,
    token_dtype,
    tokenizer_fingerprint,
)
from layermoe_ds.errors import InputError, OutputExistsError
from layermoe_ds.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

# `load_tokenizer` (transformers) is imported inside the two functions that need it: a spawned tokenizer worker
# imports this module, and with a fast tokenizer it starts without transformers (~0.1 s instead of ~2.5 s a worker).

CHUNK_BYTES = 32 << 20
_WORKER: dict = {}


def _init_worker(backend_spec: str | None, tokenizer_dir: str, specials: tuple[int | None, int]) -> None:
    """A worker gets the main process's exact tokenizer: a fast tokenizer's serialised backend (no transformers
    import, well under a second to start), else the directory loaded again."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a worker: the workers are the parallelism
    if backend_spec is not None:
        _WORKER.update(encode=backend_encoder(Tokenizer.from_str(backend_spec)), specials=specials)
        return
    from layermoe_ds.data.tokenizer import load_tokenizer

    _WORKER.update(encode=batch_encoder(load_tokenizer(Path(tokenizer_dir))), specials=specials)


def _worker_task(chunk: Chunk, shards: str, dtype: str, selection: Selection) -> dict:
    return tokenize_chunk(chunk, Path(shards), _WORKER["encode"], _WORKER["specials"], np.dtype(dtype), selection)


def _scan_task(chunk: Chunk, langs: tuple[str, ...], sample_cuts: dict[str, int], seed: int) -> dict:
    return scan_chunk(chunk, _WORKER["encode"], langs, sample_cuts, seed)


def source_meta(source: Source) -> dict:
    """What identifies a source's input (a cache key, the plan): its file and how it is read."""
    stat = source.path.stat()
    meta = {
        "path": str(source.path.resolve()),
        "kind": source.kind,
        "lang": source.lang,
        "split": source.split,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    defaults = Source(source.path, source.kind)
    meta.update({k: v for k, v in asdict(source).items() if k not in meta and v != getattr(defaults, k)})
    return meta


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
    budgets: dict[str, Budget] | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.0,
) -> dict:
    """Prepare `sources` into `out` (see the module docstring); returns the manifest. A directory that holds this
    exact input already is returned as it is; one that holds other input is refused. `doc_separator`: the token
    that ends each document instead of the tokenizer's EOS (an Instruct tokenizer's EOS ends chat turns).
    `budgets`: per language, a seeded hash sample of its training documents; `holdout_fraction`: valid and test,
    each, carved from the text of languages that have none (data/sampling.py)."""
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
    if not 0 <= holdout_fraction < 0.5:
        raise InputError(f"--holdout-fraction: {holdout_fraction} must be in [0, 0.5)")
    budgets = budgets or {}
    plan = {
        "tokenizer": tokenizer_fingerprint(tokenizer, separator),
        "sources": [source_meta(s) for s in sources],
        "langs": sorted(langs) if langs is not None else None,
        "splits": sorted(splits) if splits is not None else None,
    }
    heldout = sorted({s.lang for s in sources if s.lang is not None and s.split != "train"})
    carved = sorted({s.lang or "*" for s in sources if s.unsplit and s.lang not in heldout}) if holdout_fraction else []
    if budgets or carved:  # (recorded only when used: a plain run's plan is what it always was)
        plan["sampling"] = {
            "budgets": {lang: asdict(b) for lang, b in sorted(budgets.items())},
            "seed": seed,
            "holdout_fraction": holdout_fraction,
        }
    selection = Selection(
        plan["langs"] and tuple(plan["langs"]),
        plan["splits"] and tuple(plan["splits"]),
        heldout=tuple(heldout),
        holdout_fraction=holdout_fraction,
        seed=seed,
    )
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
    ranges = [(s, *r) for s in sources for r in chunk_ranges(s, chunk_bytes)]
    chunks = [Chunk.of(n, s, start, end, weight) for n, (s, start, end, weight) in enumerate(ranges)]
    sampled = {}
    if budgets:
        sampled = _sample(chunks, budgets, seed, tokenizer, tokenizer_dir, specials, workers)
        cuts = tuple((lang, entry["threshold"]) for lang, entry in sorted(sampled.items()))
        selection = replace(selection, thresholds=tuple((lang, -1 if c is None else c) for lang, c in cuts))
    records = {c.number: r for c in chunks if (r := _done_record(shards, c)) is not None}
    pending = [c for c in chunks if c.number not in records]
    total_bytes = sum(c.weight for c in pending)
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
    if "sampling" in plan:
        manifest["sampling"] = {**plan["sampling"], "taken": sampled, "carved": carved}
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
    yield from _in_workers(
        chunks,
        tokenizer,
        tokenizer_dir,
        specials,
        workers,
        lambda chunk, encode: tokenize_chunk(chunk, shards, encode, specials, dtype, selection),
        lambda pool, chunk: pool.submit(_worker_task, chunk, str(shards), dtype.str, selection),
    )


def _in_workers(chunks, tokenizer, tokenizer_dir, specials, workers, here, there) -> Iterable:
    """Each chunk's result, in order: `here(chunk, encode)` in this process with one worker, else `there(pool,
    chunk)` submitted to spawned workers that hold the same tokenizer."""
    if workers == 1:  # in this process, with the tokenizer already loaded
        encode = batch_encoder(tokenizer)
        for chunk in chunks:
            yield here(chunk, encode)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else None
    with ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(spec, str(tokenizer_dir), specials),
    ) as pool:
        futures = [there(pool, c) for c in chunks]
        for future in futures:  # in order: an error surfaces as the first failing chunk's
            yield future.result()


def _sample(chunks, budgets, seed, tokenizer, tokenizer_dir, specials, workers) -> dict[str, dict]:
    """The first pass of a budget: each language's hash threshold, and what it takes (data/sampling.py)."""
    langs = tuple(sorted(budgets))
    text_bytes: dict[str, int] = {}
    for chunk in chunks:
        if chunk.split == "train" or chunk.lang is None:
            for lang in langs if chunk.lang is None else [chunk.lang]:
                text_bytes[lang] = text_bytes.get(lang, 0) + max(chunk.weight, 1)
    # Tokens are counted for a hash-chosen ~RATIO_SAMPLE_BYTES of each language (its bytes per token).
    sample_cuts = {
        lang: min(2**64 - 1, int(2**64 * RATIO_SAMPLE_BYTES / text_bytes[lang])) for lang in langs if lang in text_bytes
    }
    scanned = [c for c in chunks if (c.split == "train" or c.lang is None) and (c.lang is None or c.lang in langs)]
    candidates = {lang: Candidates() for lang in langs}
    results = _in_workers(
        scanned,
        tokenizer,
        tokenizer_dir,
        specials,
        workers,
        lambda chunk, encode: scan_chunk(chunk, encode, langs, sample_cuts, seed),
        lambda pool, chunk: pool.submit(_scan_task, chunk, langs, sample_cuts, seed),
    )
    for found in results:
        for lang, (hashes, nbytes, tokens) in found.items():
            budget = budgets[lang]
            keep_bytes = None if budget.tokens is None else int(budget.tokens * MAX_BYTES_PER_TOKEN)
            candidates[lang].add(hashes, nbytes, tokens, budget.documents, keep_bytes)
    return {lang: cut_for(candidates[lang], budgets[lang]) for lang in langs}


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
