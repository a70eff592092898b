"""What every step reads: per language, a `TokenStream` of one split, from a prepared directory (`layermoe data
tokenize`; its tokenizer checked) or from raw text, tokenized once into a cache the first time a run uses it
(`$LAYERMOE_DATA_CACHE`, default ~/.cache/layermoe_ds/tokens; keyed by each file's path, size and mtime and the
tokenizer's fingerprint)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from layermoe_ds.data.loading import Source, raw_sources
from layermoe_ds.data.prepare import default_workers, source_meta, tokenize
from layermoe_ds.data.tokens import VERSION, PreparedData, TokenStream, is_prepared, tokenizer_fingerprint
from layermoe_ds.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("LAYERMOE_DATA_CACHE", Path.home() / ".cache" / "layermoe_ds" / "tokens"))


def _cached(source: Source, tokenizer, tokenizer_dir: Path, fingerprint: str) -> PreparedData:
    """The cache entry of one raw file under this tokenizer, prepared by whichever process gets the lock first;
    the others (the other ranks of a run) wait for it and then map it."""
    key_doc = json.dumps({"v": VERSION, "tokenizer": fingerprint, "source": source_meta(source)}, sort_keys=True)
    entry = cache_root() / hashlib.sha256(key_doc.encode()).hexdigest()[:20]
    if not is_prepared(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process to tokenize %s into %s", source.path, entry)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not is_prepared(entry):
                log.info("tokenizing %s once into %s", source.path, entry)
                tokenize([source], tokenizer_dir, entry, default_workers(), tokenizer=tokenizer)
    return PreparedData(entry)


def open_streams(
    data: Path, tokenizer, tokenizer_dir: Path, langs: Sequence[str], split: str
) -> dict[str, TokenStream]:
    """language → TokenStream of `split` for `langs`, from a prepared directory (its tokenizer checked) or from raw
    text through the cache. Unknown languages, missing splits and empty languages are errors naming the data."""
    data, fingerprint = Path(data), tokenizer_fingerprint(tokenizer)
    if is_prepared(data):
        prepared = PreparedData(data)
        prepared.check_tokenizer(tokenizer, str(tokenizer_dir))
        found = prepared.languages()
        missing = [lang for lang in langs if lang not in found]
        if missing:
            raise InputError(f"languages {missing} not found in {data}; found: {sorted(found)}")
        return {lang: prepared.stream(lang, split) for lang in langs}
    streams = {}
    entries = [_cached(source, tokenizer, tokenizer_dir, fingerprint) for source in raw_sources(data, langs, [split])]
    for lang in langs:
        found = {name: splits for entry in entries for name, splits in entry.languages().items()}
        if lang not in found:
            raise InputError(f"languages [{lang!r}] not found in {data}; found: {sorted(found)}")
        holding = [e for e in entries if split in e.languages().get(lang, [])]
        if not holding:
            raise MissingInputError(f"data: no {split} split for language {lang!r} in {data}")
        # One stream over every file that holds the language's split, in the files' order.
        parts = [entry.stream(lang, split) for entry in holding]
        streams[lang] = parts[0] if len(parts) == 1 else TokenStream(
            f"{lang}/{split}", [s for p in parts for s in p.shards], parts[0].vocab_size,
            sum(p.num_bytes for p in parts), parts[0].separator
        )  # fmt: skip
    return streams
