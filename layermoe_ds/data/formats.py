"""The containers users hold text in, read as documents in bounded memory: plain and compressed lines (`.txt`,
`.jsonl`, and either as `.gz`, `.zst`, `.xz`), Parquet (by row group) and the Arrow files `datasets.save_to_disk`
writes (by record batch). A document is a line of a `.txt`, or the text field of a JSON record or a table row, its
inner newlines kept. Errors name the file and the line or row."""

from __future__ import annotations

import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterator
from pathlib import Path

from layermoe_ds.errors import InputError

COMPRESSIONS = (".gz", ".zst", ".xz")
TABLES = ("parquet", "arrow")
TABLE_BATCH_ROWS = 1024  # rows a Parquet read decodes at a time


def container_of(path: Path) -> tuple[str, str | None] | None:
    """(record kind: txt, jsonl, parquet or arrow; compression or None) from a file name; None: not text data."""
    name = Path(path).name
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    inner = name[: -len(compression)] if compression else name
    for kind in ("jsonl", "txt"):
        if inner.endswith(f".{kind}"):
            return kind, compression
    if compression is None:
        for kind in TABLES:
            if inner.endswith(f".{kind}"):
                return kind, None
    return None


def open_compressed(path: Path, compression: str):
    """A binary stream of the decompressed bytes."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise InputError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))


def compressed_lines(path: Path, compression: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) of a compressed file; a truncated or corrupt file is one
    error naming it and the last whole line."""
    number = 0
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, lzma.LZMAError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    try:
        with open_compressed(path, compression) as stream:
            for raw in stream:
                number += 1
                yield number, raw.rstrip(b"\n").rstrip(b"\r")
    except errors as exc:
        raise InputError(f"{path}: truncated or corrupt {compression[1:]} data after line {number} ({exc})") from exc


def parquet_row_groups(path: Path) -> list[int]:
    """Each row group's uncompressed size in bytes (what chunking weighs); a file that is not Parquet is one error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file, truncated or corrupt ({exc})") from exc
    return [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]


def table_columns(path: Path, kind: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
        with pa.memory_map(str(path)) as source:
            return list(pa.ipc.open_stream(source).schema.names)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable {kind} file, truncated or corrupt ({exc})") from exc


def table_rows(
    path: Path, kind: str, columns: list[str], start: int = 0, end: int | None = None
) -> Iterator[tuple[int, dict]]:
    """(0-based row number in the file, {column: value}) for row groups [start, end) of a Parquet file, or every
    row of an Arrow stream file; `columns` must exist (the error lists those found)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = table_columns(path, kind)
    missing = [c for c in columns if c not in found]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (--text-field / --lang-field); its columns: {found}")
    row = 0
    try:
        if kind == "parquet":
            parquet = pq.ParquetFile(path)
            groups = list(range(start, parquet.metadata.num_row_groups if end is None else end))
            row = sum(parquet.metadata.row_group(i).num_rows for i in range(start))
            batches = parquet.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=groups, columns=columns)
            yield from _rows(batches, columns, row)
        else:
            with pa.memory_map(str(path)) as source:
                yield from _rows(pa.ipc.open_stream(source), columns, 0)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: truncated or corrupt {kind} data near row {row} ({exc})") from exc


def _rows(batches, columns: list[str], first: int) -> Iterator[tuple[int, dict]]:
    row = first
    for batch in batches:
        values = {c: batch.column(batch.schema.get_field_index(c)).to_pylist() for c in columns}
        for i in range(batch.num_rows):
            yield row, {c: values[c][i] for c in columns}
            row += 1


def parse_record(path: Path, where: Callable[[], str], text: str) -> dict | None:
    """A JSON line as a dict (None for a blank line); invalid JSON or a non-object names the file and line
    (`where()`, called only for the message)."""
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{where()}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}:{where()}: a record must be a JSON object, not {type(record).__name__}")
    return record


def string_field(path: Path, where: Callable[[], str], record: dict, name: str, what: str) -> str:
    """A record's string field; missing or not a string names the file, the line or row, and what was found."""
    value = record.get(name)
    if not isinstance(value, str):
        found = "missing" if name not in record else f"a {type(value).__name__}"
        raise InputError(f"{path}:{where()}: the {what} field {name!r} must be a string, found {found}")
    return value
