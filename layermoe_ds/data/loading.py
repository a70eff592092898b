"""Read a user's text data (or the embedded corpus) per language and split, through HF `datasets` on local files.

Accepted layouts, which languages are old or new being config, not layout:
- a directory of `<lang>.<split>.txt` (one document a line) or `<lang>.<split>.jsonl` (`{"text": ...}` a line);
- one `.jsonl` file with `{"text", "lang"}` records (and an optional `"split"`; without it every record is "train").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".jsonl")


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 (byte {exc.start}, line {line}): convert it with iconv") from exc


def available_languages(data: Path) -> dict[str, dict[str, Path]]:
    """Map language → split → file for a data directory (a single jsonl file maps every language to itself)."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data: {data} does not exist")
    if data.is_file():
        if data.suffix != ".jsonl":
            raise ValueError(f"data: {data} is a file but not .jsonl; give a directory or a jsonl with text+lang")
        langs: dict[str, dict[str, Path]] = {}
        for record in _iter_jsonl(data, need_lang=True):
            langs.setdefault(record["lang"], {})[record.get("split", "train")] = data
        return langs
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(data.iterdir()):
        parts = path.name.split(".")
        if len(parts) == 3 and parts[1] in SPLITS and path.suffix in TEXT_SUFFIXES:
            lang, split = parts[0], parts[1]
            if split in found.get(lang, {}):
                raise ValueError(f"data: both {found[lang][split].name} and {path.name} hold {lang}/{split}")
            found.setdefault(lang, {})[split] = path
    if not found:
        raise FileNotFoundError(f"data: {data} holds no <lang>.<train|valid|test>.<txt|jsonl> files")
    return found


def _iter_jsonl(path: Path, need_lang: bool):
    _check_utf8(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: a record needs a string field 'text'")
            if need_lang and not isinstance(record.get("lang"), str):
                raise ValueError(f"{path}:{number}: a record needs a string field 'lang'")
            yield record


def load_texts(data: Path, langs: Sequence[str], split: str) -> dict[str, list[str]]:
    """Documents of each language in `langs` for `split`, in file order; empty documents are dropped.

    Errors name the culprit: an unknown language (listing those found), a missing split file, a non-UTF-8 file,
    a language whose split holds no text.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for a hub
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    found = available_languages(Path(data))
    missing = [lang for lang in langs if lang not in found]
    if missing:
        raise ValueError(f"languages {missing} not found in {data}; found: {sorted(found)}")
    datasets.disable_progress_bars()
    out: dict[str, list[str]] = {}
    for lang in langs:
        path = found[lang].get(split)
        if path is None:
            raise FileNotFoundError(f"data: no {split} split for language {lang!r} in {data} "
                                    f"(expected {lang}.{split}.txt or .jsonl)")
        if Path(data).is_file():
            texts = [r["text"] for r in _iter_jsonl(path, need_lang=True) if r["lang"] == lang and r.get("split", "train") == split]
        else:
            _check_utf8(path)
            if not path.read_bytes().strip():  # HF datasets cannot build an empty file ("SchemaInferenceError")
                raise ValueError(f"data: language {lang!r} has no text in its {split} split ({path} is empty)")
            if path.suffix == ".txt":
                ds = datasets.load_dataset("text", data_files=str(path), split="train")
            else:
                list(_iter_jsonl(path, need_lang=False))  # validates every record with line numbers before datasets parses it
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            texts = ds["text"]
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError(f"data: language {lang!r} has no text in its {split} split ({path})")
        out[lang] = texts
    return out
