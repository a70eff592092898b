"""Find a user's raw text per language and split, and stream its documents without holding a file in memory.

Accepted layouts, which languages are old or new being config, not layout:
- a directory of `<lang>.<split>.txt` (one document a line) or `<lang>.<split>.jsonl` (`{"text": ...}` a line);
- one `.jsonl` file with `{"text", "lang"}` records (and an optional `"split"`; without it every record is "train").

A document is one line (txt) or one record's text (jsonl); documents that are empty or only whitespace are dropped.
Everything reads line by line, in byte ranges that start after a newline, so several workers can share a file
(data/prepare.py tokenizes them that way). Errors name the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from layermoe_ds.errors import InputError, MissingInputError

SPLITS = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Source:
    """One raw file: `lang`/`split` are fixed for a per-language file and None for a mixed jsonl (per record)."""

    path: Path
    kind: str  # "txt", "jsonl" (one language) or "mixed" (records carry lang and split)
    lang: str | None = None
    split: str | None = None


def line_number(path: Path, offset: int) -> int:
    """1-based line of byte `offset` (only on error paths: it reads the file up to there)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 22, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def _decode(path: Path, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        raise InputError(
            f"{path}: not UTF-8 (byte {at}, line {line_number(path, at)}): convert it with iconv"
        ) from exc


def _record(path: Path, text: str, offset: int, need_lang: bool) -> dict | None:
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{line_number(path, offset)}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise InputError(f"{path}:{line_number(path, offset)}: a record needs a string field 'text'")
    if need_lang:
        if not isinstance(record.get("lang"), str):
            raise InputError(f"{path}:{line_number(path, offset)}: a record needs a string field 'lang'")
        split = record.get("split", "train")
        if split not in SPLITS:
            raise InputError(f"{path}:{line_number(path, offset)}: split {split!r} is not one of {SPLITS}")
    return record


def iter_records(source: Source, start: int = 0, end: int | None = None) -> Iterator[tuple[str, str, str, int]]:
    """(lang, split, text, nbytes) of every non-empty document whose line starts in [start, end) of the file.

    `start` must be 0 or just after a newline (see `line_boundaries`); `nbytes` is the text's UTF-8 length.
    """
    path = source.path
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for raw in f:
            if end is not None and offset >= end:
                break
            line_offset, offset = offset, offset + len(raw)
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            text = _decode(path, body, line_offset)
            if source.kind == "txt":
                if text.strip():
                    yield source.lang, source.split, text, len(body)
                continue
            record = _record(path, text, line_offset, need_lang=source.kind == "mixed")
            if record is None or not record["text"].strip():
                continue
            doc = record["text"]
            if source.kind == "mixed":
                yield record["lang"], record.get("split", "train"), doc, len(doc.encode("utf-8"))
            else:
                yield source.lang, source.split, doc, len(doc.encode("utf-8"))


def line_boundaries(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about `chunk_bytes` each, every one starting at a line start."""
    size = Path(path).stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + chunk_bytes < size:
            f.seek(starts[-1] + chunk_bytes)
            f.readline()  # to the end of the line the cut fell in
            position = f.tell()
            if position >= size:
                break
            starts.append(position)
    return list(zip(starts, [*starts[1:], size], strict=True))


def _directory_sources(data: Path) -> dict[str, dict[str, Source]]:
    found: dict[str, dict[str, Source]] = {}
    for path in sorted(data.iterdir()):
        parts = path.name.split(".")
        if len(parts) == 3 and parts[1] in SPLITS and path.suffix in TEXT_SUFFIXES:
            lang, split = parts[0], parts[1]
            if split in found.get(lang, {}):
                raise InputError(f"data: both {found[lang][split].path.name} and {path.name} hold {lang}/{split}")
            found.setdefault(lang, {})[split] = Source(path, path.suffix[1:], lang, split)
    if not found:
        raise MissingInputError(f"data: {data} holds no <lang>.<train|valid|test>.<txt|jsonl> files")
    return found


def available_languages(data: Path) -> dict[str, dict[str, Path]]:
    """Map language → split → file for a raw data directory or a single jsonl (read once, record by record)."""
    data = Path(data)
    if not data.exists():
        raise MissingInputError(f"data: {data} does not exist")
    if data.is_file():
        if data.suffix != ".jsonl":
            raise InputError(f"data: {data} is a file but not .jsonl; give a directory or a jsonl with text+lang")
        langs: dict[str, dict[str, Path]] = {}
        for lang, split, _, _ in iter_records(Source(data, "mixed")):
            langs.setdefault(lang, {})[split] = data
        return langs
    return {lang: {split: s.path for split, s in splits.items()} for lang, splits in _directory_sources(data).items()}


def raw_sources(data: Path, langs: Sequence[str], splits: Sequence[str]) -> list[Source]:
    """The files that hold `langs` × `splits`, checked before any work: unknown languages (listing those found) and
    missing split files are errors. A single jsonl is one mixed source (its languages are checked after reading)."""
    data = Path(data)
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"split: {split!r} is not one of {SPLITS}")
    if not data.exists():
        raise MissingInputError(f"data: {data} does not exist")
    if data.is_file():
        if data.suffix != ".jsonl":
            raise InputError(f"data: {data} is a file but not .jsonl; give a directory or a jsonl with text+lang")
        return [Source(data, "mixed")]
    found = _directory_sources(data)
    missing = [lang for lang in langs if lang not in found]
    if missing:
        raise InputError(f"languages {missing} not found in {data}; found: {sorted(found)}")
    sources = []
    for lang in langs:
        for split in splits:
            if split not in found[lang]:
                raise MissingInputError(
                    f"data: no {split} split for language {lang!r} in {data} (expected {lang}.{split}.txt or .jsonl)"
                )
            sources.append(found[lang][split])
    return sources


def iter_documents(data: Path, lang: str, split: str) -> Iterator[str]:
    """The documents of one language and split, streamed in file order (nothing else is kept in memory)."""
    for source in raw_sources(data, [lang], [split]):
        for record_lang, record_split, text, _ in iter_records(source):
            if record_lang == lang and record_split == split:
                yield text


def select_sources(data: Path, langs: Sequence[str] | None = None, splits: Sequence[str] | None = None) -> list[Source]:
    """The raw files of `data` for `langs` and `splits` (default: every one found); one jsonl is one source (its
    records say language and split)."""
    data = Path(data)
    if data.is_file():
        return raw_sources(data, [], [])
    found = available_languages(data)
    return [
        source
        for lang in langs or sorted(found)
        for source in raw_sources(data, [lang], splits or sorted(found.get(lang, {})))
    ]
