"""Text in the formats and layouts users download (data/formats.py, data/loading.py, data/sampling.py): Parquet,
compressed JSON lines and `save_to_disk` Arrow tokenize to exactly the streams of the same documents as `.jsonl`; the
held-out split and the per-language samples are the same on every run and worker count; every bad input is one line
naming the file and the row."""

from __future__ import annotations

import gzip
import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest

from layermoe_ds.cli import main
from layermoe_ds.data.loading import Reading, select_sources
from layermoe_ds.data.prepare import tokenize
from layermoe_ds.data.sampling import Budget
from layermoe_ds.data.streams import open_streams

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = {
    "en": "the help page shows how a table is sorted and filtered in a sheet".split(),
    "el": "η σελίδα βοήθειας δείχνει πώς ταξινομείται ένας πίνακας στο φύλλο".split(),
    "fr": "la page d'aide montre comment trier et filtrer un tableau".split(),
}


def documents(lang: str, n: int, seed: int) -> list[str]:
    """Documents with inner newlines (they must survive every container), some long."""
    rng = random.Random(f"{lang}-{seed}")
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choices(WORDS[lang], k=rng.randint(3, 30))) for _ in range(rng.randint(1, 3))]
        docs.append(f"{i}: " + "\n".join(lines))
    return docs


DOCS = {(lang, split): documents(lang, n, i) for i, (lang, split, n) in enumerate(
    [("en", "train", 240), ("el", "train", 240), ("fr", "train", 120), ("en", "test", 20), ("el", "test", 20),
     ("fr", "test", 12)])}  # fmt: skip


def write_jsonl(path: Path, docs: list[str], key: str = "text", opener=open) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "id": len(doc)}, ensure_ascii=False) + "\n")


def write_parquet(path: Path, docs: list[str], key: str = "text", **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({key: docs, "url": [f"https://example.org/{i}" for i in range(len(docs))], **columns})
    pq.write_table(table, path, row_group_size=25)  # several row groups: several chunks


def write_zst(path: Path, docs: list[str]) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(body))


def flat(root: Path, suffix: str, writer) -> Path:
    for (lang, split), docs in DOCS.items():
        writer(root / f"{lang}.{split}.{suffix}", docs)
    return root


def foldered(root: Path, place, writer, splits=("train", "test")) -> Path:
    for (lang, split), docs in DOCS.items():
        if split in splits:
            writer(root / place(lang, split), docs)
    return root


FLORES = {"en": "eng_Latn", "el": "ell_Grek", "fr": "fra_Latn"}


def layouts(tmp: Path) -> dict[str, tuple[Path, float]]:
    """name → (data directory, holdout fraction): every layout of issue-37 users, holding DOCS."""
    gz = lambda p, d: write_jsonl(p, d, opener=gzip.open)  # noqa: E731
    xz = lambda p, d: write_jsonl(p, d, opener=lzma.open)  # noqa: E731
    out = {
        "parquet": (flat(tmp / "parquet", "parquet", write_parquet), 0.0),
        "jsonl.gz": (flat(tmp / "gz", "jsonl.gz", gz), 0.0),
        "jsonl.xz": (flat(tmp / "xz", "jsonl.xz", xz), 0.0),
        "jsonl.zst": (flat(tmp / "zst", "jsonl.zst", write_zst), 0.0),
        "fineweb-2": (
            foldered(tmp / "fw2", lambda lang, s: f"data/{FLORES[lang]}/{s}/000_00000.parquet", write_parquet),
            0.0,
        ),  # fmt: skip
        "hplt-2": (foldered(tmp / "hplt", lambda lang, s: f"{FLORES[lang]}/{s}-00000.parquet", write_parquet), 0.0),
        "culturax": (
            foldered(tmp / "cx", lambda lang, s: f"{lang}/{lang}_part_00000.parquet", write_parquet, ("train",)),
            0.0,
        ),  # fmt: skip
        "madlad-400": (
            foldered(tmp / "madlad", lambda lang, s: f"data/{lang}/{lang}_clean_0000.jsonl.gz", gz, ("train",)),
            0.0,
        ),  # fmt: skip
    }
    datasets = pytest.importorskip("datasets")
    for (lang, split), docs in DOCS.items():
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp / "arrow" / lang / split))
    out["save_to_disk"] = (tmp / "arrow", 0.0)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from layermoe_ds.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir, tokenizer) -> dict:
    """(lang, split) → token ids of DOCS given as flat .jsonl."""
    root = flat(tmp_path_factory.mktemp("ref") / "jsonl", "jsonl", write_jsonl)
    return streams_of(tokenize(select_sources(root), tokenizer_dir, root.parent / "p", tokenizer=tokenizer,
                               progress=False), root.parent / "p", tokenizer, tokenizer_dir)  # fmt: skip


def streams_of(manifest: dict, out: Path, tokenizer, tokenizer_dir) -> dict:
    ids = {}
    for lang, splits in manifest["streams"].items():
        for split in splits:
            stream = open_streams(out, tokenizer, tokenizer_dir, [lang], split)[lang]
            ids[(lang, split)] = stream.read(0, stream.num_tokens)
    return ids


@pytest.mark.parametrize("workers", [1, 2])
def test_every_format_and_layout_gives_the_jsonl_token_streams(workers, reference, tokenizer_dir, tokenizer, tmp_path):
    for name, (root, fraction) in layouts(tmp_path).items():
        sources = select_sources(root)
        manifest = tokenize(sources, tokenizer_dir, tmp_path / f"out-{name}", workers=workers, tokenizer=tokenizer,
                            chunk_bytes=2000, progress=False, holdout_fraction=fraction)  # fmt: skip
        got = streams_of(manifest, tmp_path / f"out-{name}", tokenizer, tokenizer_dir)
        expected = {key: ids for key, ids in reference.items() if key in got or name not in ("culturax", "madlad-400")}
        assert sorted(got) == sorted(expected), name
        for key, ids in expected.items():
            assert np.array_equal(got[key], ids), (name, key)


def test_raw_runs_read_the_new_formats_through_the_token_cache(reference, tokenizer_dir, tokenizer, tmp_path):
    """A run's --data can be such a directory as it is (no carving or sampling there): one stream per language
    over all its files."""
    root = foldered(tmp_path / "fw2", lambda lang, s: f"data/{FLORES[lang]}/{s}/000_0000{len(s) % 2}.parquet",
                    write_parquet)  # fmt: skip
    write_parquet(root / "data" / "ell_Grek" / "train" / "000_00009.parquet", ["one more Greek document"])
    stream = open_streams(root, tokenizer, tokenizer_dir, ["el"], "train")["el"]
    extra = tokenizer("one more Greek document", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert np.array_equal(stream.read(0, stream.num_tokens), np.concatenate([reference[("el", "train")], extra]))
    culturax = foldered(tmp_path / "cx", lambda lang, s: f"{lang}/{lang}_part_0.parquet", write_parquet, ("train",))
    with pytest.raises(FileNotFoundError, match="no test split for language 'el'.*carves held-out splits"):
        open_streams(culturax, tokenizer, tokenizer_dir, ["el"], "test")


def carved_and_sampled(root: Path, out: Path, tokenizer_dir, tokenizer, workers: int, **options) -> tuple[dict, dict]:
    manifest = tokenize(select_sources(root), tokenizer_dir, out, workers=workers, tokenizer=tokenizer,
                        chunk_bytes=3000, progress=False, **options)  # fmt: skip
    return manifest, streams_of(manifest, out, tokenizer, tokenizer_dir)


def test_held_out_splits_and_samples_are_the_same_on_every_run_and_worker_count(tokenizer_dir, tokenizer, tmp_path):
    root = foldered(tmp_path / "cx", lambda lang, s: f"{lang}/{lang}_part_00000.parquet", write_parquet, ("train",))
    options = {"holdout_fraction": 0.1, "budgets": {"el": Budget(documents=100), "en": Budget(tokens=6000)}}
    one, ids_one = carved_and_sampled(root, tmp_path / "a", tokenizer_dir, tokenizer, 1, **options)
    two, ids_two = carved_and_sampled(root, tmp_path / "b", tokenizer_dir, tokenizer, 2, **options)
    again, ids_again = carved_and_sampled(root, tmp_path / "c", tokenizer_dir, tokenizer, 2, **options)
    assert sorted(ids_one) == sorted(ids_two) == sorted(ids_again)
    assert all(np.array_equal(ids_one[k], ids_two[k]) and np.array_equal(ids_one[k], ids_again[k]) for k in ids_one)
    streams = one["streams"]
    assert {lang: sorted(s) for lang, s in streams.items()} == {lang: ["test", "train", "valid"] for lang in WORDS}
    taken = one["sampling"]["taken"]
    assert taken["el"]["documents"] == 100 and taken["el"]["seen"] == 240
    el_docs = sum(streams["el"][s]["documents"] for s in streams["el"])
    assert el_docs == 100  # the sample, then carved: the held-out documents come out of it
    assert 0.9 * 6000 <= sum(streams["en"][s]["tokens"] for s in streams["en"]) <= 1.1 * 6000
    assert taken["en"]["bytes_per_token"] > 0 and one["sampling"]["carved"] == ["el", "en", "fr"]
    fr = sum(streams["fr"][s]["documents"] for s in streams["fr"])
    assert fr == 120 and 2 <= streams["fr"]["test"]["documents"] <= 25  # no budget for fr: all of it, carved
    # The sample is a hash's, not the first 100 documents: later ones are in it, early ones are not.
    first_ids = {int(d.split(":")[0]) for d in DOCS[("el", "train")][:100]}
    kept = {int(doc.split(":")[0]) for doc in _texts(ids_one[("el", "train")], tokenizer)}
    assert kept - first_ids and first_ids - kept
    # Another seed takes another sample.
    other, _ = carved_and_sampled(root, tmp_path / "d", tokenizer_dir, tokenizer, 1, seed=1, **options)
    assert other["sampling"]["taken"]["el"]["threshold"] != taken["el"]["threshold"]


def _texts(ids: np.ndarray, tokenizer) -> list[str]:
    ends = np.flatnonzero(ids == tokenizer.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e]) for s, e in zip(starts, ends, strict=True)]


def one_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("layermoe data: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_are_one_line_naming_the_file_and_row(tokenizer_dir, tmp_path, capsys):
    tokenize_cmd = ["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out"), "--data"]
    write_parquet(tmp_path / "a" / "el" / "part.parquet", ["ok"], key="content")
    line = one_error([*tokenize_cmd, str(tmp_path / "a")], capsys)
    assert "part.parquet: no column 'text'" in line and "['content', 'url']" in line
    assert "--text-field" in line
    write_parquet(tmp_path / "b" / "el.train.parquet", ["ok", "fine"], key="body")
    pq.write_table(pa.table({"text": ["ok", None, "x"]}), tmp_path / "b" / "el.train.parquet")
    assert "el.train.parquet:row 1: the text field 'text' must be a string, found a NoneType" in one_error(
        [*tokenize_cmd, str(tmp_path / "b")], capsys
    )
    (tmp_path / "c").mkdir()
    write_parquet(tmp_path / "c" / "el.train.parquet", DOCS[("el", "train")])
    whole = (tmp_path / "c" / "el.train.parquet").read_bytes()
    (tmp_path / "c" / "el.train.parquet").write_bytes(whole[: len(whole) // 2])
    assert "el.train.parquet: not a readable Parquet file, truncated or corrupt" in one_error(
        [*tokenize_cmd, str(tmp_path / "c")], capsys
    )
    write_jsonl(tmp_path / "d" / "el.train.jsonl.gz", DOCS[("el", "train")], opener=gzip.open)
    whole = (tmp_path / "d" / "el.train.jsonl.gz").read_bytes()
    (tmp_path / "d" / "el.train.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    line = one_error([*tokenize_cmd, str(tmp_path / "d"), "--out", str(tmp_path / "out_d")], capsys)
    assert "el.train.jsonl.gz: truncated or corrupt gz data after line" in line
    write_parquet(tmp_path / "e" / "xyz_Latn" / "train-0.parquet", ["ok"])
    write_parquet(tmp_path / "e" / "ekk_Latn" / "train-0.parquet", ["ok"])
    line = one_error([*tokenize_cmd, str(tmp_path / "e")], capsys)
    assert "['ekk_Latn', 'xyz_Latn']" in line and "--lang-map" in line
    line = one_error([*tokenize_cmd, str(tmp_path / "e"), "--lang-map", "ekk_Latn=et,xyz_Latn=xy", "--langs", "el"],
                     capsys)  # fmt: skip
    assert "languages ['el'] not found" in line and "found: ['et', 'xy']" in line
    assert "--max-docs-per-lang: 'el=many'" in one_error([*tokenize_cmd, str(tmp_path / "e"), "--lang-map",
                                                          "ekk_Latn=et,xyz_Latn=xy", "--max-docs-per-lang", "el=many"],
                                                         capsys)  # fmt: skip


def test_a_column_of_languages_and_a_lang_map(reference, tokenizer_dir, tokenizer, tmp_path):
    """One Parquet file mixing languages by a column with FLORES-200 codes, mapped to the short ones."""
    rows = [(lang, doc) for (lang, split), docs in DOCS.items() if split == "train" for doc in docs]
    write_parquet(tmp_path / "mixed" / "all.parquet", [d for _, d in rows], code=[FLORES[lang] for lang, _ in rows])
    sources = select_sources(tmp_path / "mixed", reading=Reading(lang_field="code"))
    manifest = tokenize(sources, tokenizer_dir, tmp_path / "out", tokenizer=tokenizer, progress=False)
    got = streams_of(manifest, tmp_path / "out", tokenizer, tokenizer_dir)
    assert sorted(got) == [(lang, "train") for lang in sorted(WORDS)]
    assert all(np.array_equal(got[key], reference[key]) for key in got)


def test_the_language_folder_is_a_known_code_before_any_short_folder_name(tmp_path):
    """`raw/el/part.parquet`: `el` (a known code), not `raw`; datasets' `cache-*.arrow` files are not data; an
    unknown short code is taken as it is."""
    from layermoe_ds.data.loading import discover

    write_parquet(tmp_path / "raw" / "el" / "part.parquet", ["α"])
    write_parquet(tmp_path / "raw" / "xyz" / "part.parquet", ["x"])
    (tmp_path / "raw" / "el" / "cache-0123.arrow").write_bytes(b"not data")
    found = {(s.path.relative_to(tmp_path).as_posix(), s.lang, s.split, s.unsplit) for s in discover(tmp_path)}
    assert found == {("raw/el/part.parquet", "el", "train", True), ("raw/xyz/part.parquet", "xyz", "train", True)}
