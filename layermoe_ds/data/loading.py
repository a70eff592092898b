"""Find a user's raw text per language and split, and stream its documents without holding a file in memory.

Files: `.txt` (one document a line), `.jsonl` (a record a line; `--text-field`, default `text`), either compressed
(`.gz`, `.zst`, `.xz`), Parquet, and the Arrow files of a `datasets.save_to_disk` directory (data/formats.py).
Where the language and split come from (languages and splits being config, not layout, beyond this):
- flat names `<lang>.<split>.<ext>` (e.g. `el.train.parquet`, `fr.test.jsonl.gz`);
- the path: a folder named by a known language code (`el`, or FLORES-200's `ell_Grek`), else the deepest folder
  named like one (`data/` skipped), and a folder or file-name prefix naming a split (`train`,
  `valid`/`validation`/`dev`, `test`): CulturaX `el/el_part_00000.parquet`, FineWeb-2
  `data/ell_Grek/train/000_00000.parquet`, HPLT 2 `ell_Grek/train-0000.parquet`, MADLAD-400
  `data/el/el_clean_0000.jsonl.gz`, `save_to_disk` `el/train/data-00000-of-00002.arrow`;
- a record field (`--lang-field`), for files that mix languages; one `.jsonl` file given as --data is such a file
  (`{"text", "lang"}`, an optional `"split"`, else "train").
Codes map to the project's short ones (FLORES-200's table, then `--lang-map`). A path with no split is "train", and
`data tokenize` carves held-out splits from it (data/sampling.py). Plain lines are read in byte ranges that start
after a newline, Parquet by row groups, so several workers share a file. Errors name the file and the line or row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layermoe_ds.data.formats import (
    TABLES,
    compressed_lines,
    container_of,
    parquet_row_groups,
    parse_record,
    string_field,
    table_columns,
    table_rows,
)
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.languages import FLORES, FLORES_CODE, SHORT, canonical, parse_lang_map

SPLITS = ("train", "valid", "test")
SPLIT_WORDS = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
LANG_FOLDER = re.compile(r"^([a-z]{2,3}|[a-z]{3}_[A-Z][a-z]{3})$")
SKIPPED_FOLDERS = {"data"}


@dataclass(frozen=True)
class Reading:
    """How records are read: the text field, the language field (files that mix languages), code → language."""

    text_field: str = "text"
    lang_field: str | None = None
    lang_map: dict[str, str] = field(default_factory=dict)


DEFAULT_READING = Reading()


@dataclass(frozen=True)
class Source:
    """One raw file. `lang` None: each record names its language (`lang_field`); then `split` None means each record
    may name its split too (the single mixed jsonl). `unsplit`: the path named no split (so "train")."""

    path: Path
    kind: str  # txt, jsonl, parquet or arrow
    lang: str | None = None
    split: str | None = None
    compression: str | None = None
    text_field: str = "text"
    lang_field: str | None = None
    unsplit: bool = False
    lang_map: str = ""  # "code=lang,…" (`--lang-map`), for the codes records carry

    @property
    def seekable(self) -> bool:
        """Plain lines, read by byte ranges (a compressed file or an Arrow stream is read whole by one worker)."""
        return self.compression is None and self.kind in ("txt", "jsonl")


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


def _lines(source: Source, start: int, end: int | None) -> Iterator[tuple[Callable[[], str], str]]:
    """(where, text) of each line in [start, end): `where()` gives its line number, computed only for an error
    message (for a plain file it reads the file up to the line)."""
    path = source.path
    if source.compression is not None:
        for number, body in compressed_lines(path, source.compression):
            yield (lambda n=number: str(n)), _decode(path, body, lambda at, n=number: f"line {n}")
        return
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
            text = _decode(path, body, lambda at, o=line_offset: f"byte {o + at}, line {line_number(path, o + at)}")
            yield (lambda o=line_offset: str(line_number(path, o))), text


def _decode(path: Path, raw: bytes, where: Callable[[int], str]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({where(exc.start)}): convert it with iconv") from exc


def iter_records(source: Source, start: int = 0, end: int | None = None) -> Iterator[tuple[str, str, str, int]]:
    """(lang, split, text, nbytes) of every non-empty document in [start, end) of the file: bytes of plain lines
    (`start` 0 or just after a newline, see `chunk_ranges`), row groups of a Parquet file; a compressed file or
    an Arrow stream whole. `nbytes` is the text's UTF-8 length."""
    path, mixed, lang_map = source.path, source.lang is None, parse_lang_map(source.lang_map)
    lang_field = source.lang_field or "lang"
    if source.kind in TABLES:
        columns = [source.text_field] + ([lang_field] if mixed else [])
        for row, values in table_rows(path, source.kind, columns, start, end):
            where = lambda r=row: f"row {r}"  # noqa: E731
            text = string_field(path, where, values, source.text_field, "text")
            if not text.strip():
                continue
            lang = canonical(string_field(path, where, values, lang_field, "language"), lang_map) if mixed else None
            yield lang or source.lang, source.split or "train", text, len(text.encode("utf-8"))
        return
    for where, line in _lines(source, start, end):
        if source.kind == "txt":
            if line.strip():
                yield source.lang, source.split, line, len(line.encode("utf-8"))
            continue
        record = parse_record(path, where, line)
        if record is None:
            continue
        text = string_field(path, where, record, source.text_field, "text")
        if not text.strip():
            continue
        if not mixed:
            yield source.lang, source.split, text, len(text.encode("utf-8"))
            continue
        lang = canonical(string_field(path, where, record, lang_field, "language"), lang_map)
        split = source.split or record.get("split", "train")
        if split not in SPLITS:
            raise InputError(f"{path}:{where()}: split {split!r} is not one of {SPLITS}")
        yield lang, split, text, len(text.encode("utf-8"))


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


def chunk_ranges(source: Source, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """How workers share a file, as (start, end, input bytes): byte ranges of plain lines, row-group ranges of a
    Parquet file (about `chunk_bytes` of uncompressed data each), the whole file otherwise."""
    if source.seekable:
        return [(start, end, end - start) for start, end in line_boundaries(source.path, chunk_bytes)]
    if source.kind == "parquet":
        sizes, ranges, start, weight = parquet_row_groups(source.path), [], 0, 0
        for i, size in enumerate(sizes):
            weight += size
            if weight >= chunk_bytes or i == len(sizes) - 1:
                ranges.append((start, i + 1, weight))
                start, weight = i + 1, 0
        return ranges or [(0, 0, 0)]
    size = Path(source.path).stat().st_size
    return [(0, size, size)]


def _place(parts: tuple[str, ...], lang_map: dict[str, str]) -> tuple[str | None, str | None]:
    """(language code, split) a file's path says: flat `<lang>.<split>.<ext>`, else the first folder named like a
    language code and a folder or file-name prefix naming a split (None where the path says nothing)."""
    name = parts[-1]
    pieces = name.split(".")
    if len(parts) == 1 and len(pieces) >= 3 and pieces[1] in SPLITS:
        return pieces[0], pieces[1]
    folders = [p for p in parts[:-1] if p not in SKIPPED_FOLDERS and p not in SPLIT_WORDS]
    # A known code first (FLORES-200's table, either form, or the user's map), so that a folder such as `raw/`
    # above `el/` is not taken for a language; else the deepest folder named like a code.
    known = next((p for p in folders if p in lang_map or p in FLORES or p in SHORT), None)
    lang = known or next((p for p in reversed(folders) if LANG_FOLDER.match(p)), None)
    split = next((SPLIT_WORDS[p] for p in parts[:-1] if p in SPLIT_WORDS), None)
    if split is None:
        prefix = re.split(r"[-_.]", name, maxsplit=1)[0]
        split = SPLIT_WORDS.get(prefix)
    return lang, split


def discover(data: Path, reading: Reading = DEFAULT_READING) -> list[Source]:
    """Every data file under the directory `data` (or the one file) as a Source, language and split decided (see
    the module docstring). Unknown FLORES-style codes and files whose language nothing tells are errors."""
    data = Path(data)
    if not data.exists():
        raise MissingInputError(f"data: {data} does not exist")
    lang_map = ",".join(f"{code}={lang}" for code, lang in sorted(reading.lang_map.items()))
    common = {"text_field": reading.text_field, "lang_map": lang_map}
    if data.is_file():
        container = container_of(data)
        if container is None or container[0] == "txt":
            raise InputError(f"data: {data} is a file but not records (.jsonl[.gz|.zst|.xz], .parquet or .arrow) "
                             "that carry a language; give a directory, or such a file with text+lang")  # fmt: skip
        kind, compression = container
        split = None if kind == "jsonl" else "train"
        return [Source(data, kind, None, split, compression, lang_field=reading.lang_field or "lang", **common)]
    sources, unknown = [], set()
    for path in sorted(
        p for p in data.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(data).parts)
    ):
        container = container_of(path)
        if container is None or path.name.startswith("cache-"):  # (datasets' map() caches beside its files)
            continue
        kind, compression = container
        parts = path.relative_to(data).parts
        code, split = _place(parts, reading.lang_map)
        if reading.lang_field is not None and kind != "txt":
            lang = None
        elif code is None and len(parts) == 1:
            continue  # beside the flat files (a README, a NOTICE): not data
        elif code is None:
            raise InputError(f"data: cannot tell the language of {path}: name it <lang>.<split>.<ext>, put it in a "
                             "<lang>/ folder, or give --lang-field")  # fmt: skip
        else:
            lang = canonical(code, reading.lang_map)
            if FLORES_CODE.match(lang):
                unknown.add(code)
                continue
        unsplit = split is None
        sources.append(Source(path, kind, lang, split or "train", compression, unsplit=unsplit,
                              lang_field=reading.lang_field, **common))  # fmt: skip
    if unknown:
        raise InputError(f"data: language codes {sorted(unknown)} in {data} are not in the FLORES-200 table; map them "
                         "with --lang-map CODE=LANG (e.g. ekk_Latn=et)")  # fmt: skip
    if not sources:
        raise MissingInputError(
            f"data: {data} holds no text files (<lang>.<train|valid|test>.<txt|jsonl|parquet…>, or <lang>/ folders of "
            ".txt, .jsonl[.gz|.zst|.xz], .parquet or .arrow)"
        )
    return sources


def _by_language(sources: list[Source]) -> dict[str, dict[str, list[Source]]]:
    found: dict[str, dict[str, list[Source]]] = {}
    for source in sources:
        if source.lang is not None:
            found.setdefault(source.lang, {}).setdefault(source.split, []).append(source)
    return found


def check_columns(sources: Sequence[Source]) -> None:
    """Every table has the text (and language) column, before any work: the error lists the columns found."""
    for source in sources:
        if source.kind in TABLES:
            found = table_columns(source.path, source.kind)
            wanted = [source.text_field] + ([source.lang_field or "lang"] if source.lang is None else [])
            missing = [c for c in wanted if c not in found]
            if missing:
                raise InputError(f"{source.path}: no column {missing[0]!r} (--text-field / --lang-field); its "
                                 f"columns: {found}")  # fmt: skip


def available_languages(data: Path, reading: Reading = DEFAULT_READING) -> dict[str, dict[str, Path]]:
    """Map language → split → a file holding it (files that mix languages are read, record by record)."""
    langs: dict[str, dict[str, Path]] = {}
    for source in discover(data, reading):
        if source.lang is not None:
            langs.setdefault(source.lang, {}).setdefault(source.split, source.path)
            continue
        for lang, split, _, _ in iter_records(source):
            langs.setdefault(lang, {}).setdefault(split, source.path)
    return langs


def raw_sources(
    data: Path, langs: Sequence[str], splits: Sequence[str], reading: Reading = DEFAULT_READING
) -> list[Source]:
    """The files that hold `langs` × `splits`, checked before any work: unknown languages (listing those found) and
    missing splits are errors. Files that mix languages are all taken (their languages are checked after reading)."""
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"split: {split!r} is not one of {SPLITS}")
    sources = discover(data, reading)
    mixed = [s for s in sources if s.lang is None]
    found = _by_language(sources)
    if mixed:
        return mixed + [s for lang in langs for split in splits for s in found.get(lang, {}).get(split, [])]
    missing = [lang for lang in langs if lang not in found]
    if missing:
        raise InputError(f"languages {missing} not found in {data}; found: {sorted(found)}")
    selected = []
    for lang in langs:
        for split in splits:
            if split not in found[lang]:
                carve = (
                    " (its text names no split: `layermoe data tokenize` carves held-out splits from it)"
                    if any(s.unsplit for group in found[lang].values() for s in group)
                    else f" (expected {lang}.{split}.txt or .jsonl)"
                )
                raise MissingInputError(f"data: no {split} split for language {lang!r} in {data}{carve}")
            selected += found[lang][split]
    return selected


def iter_documents(data: Path, lang: str, split: str) -> Iterator[str]:
    """The documents of one language and split, streamed in file order (nothing else is kept in memory)."""
    for source in raw_sources(data, [lang], [split]):
        for record_lang, record_split, text, _ in iter_records(source):
            if record_lang == lang and record_split == split:
                yield text


def select_sources(
    data: Path,
    langs: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    reading: Reading = DEFAULT_READING,
) -> list[Source]:
    """The raw files of `data` for `langs` and `splits` (default: every one found); files that mix languages are
    all taken (their records say language and split), and so are files whose path names no split (held-out splits
    are carved from them)."""
    sources = discover(data, reading)
    if any(s.lang is None for s in sources):
        return sources
    found = _by_language(sources)
    missing = [lang for lang in langs or () if lang not in found]
    if missing:
        raise InputError(f"languages {missing} not found in {data}; found: {sorted(found)}")
    for lang in langs or sorted(found):
        unsplit = any(s.unsplit for group in found[lang].values() for s in group)
        for split in splits or ():
            if split not in found[lang] and not unsplit:
                raise MissingInputError(f"data: no {split} split for language {lang!r} in {data}")
    return [
        source
        for lang in langs or sorted(found)
        for split in sorted(found[lang])
        for source in found[lang][split]
        if splits is None or split in splits or source.unsplit
    ]
