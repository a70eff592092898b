import json
import unicodedata
from collections import Counter

import pytest

from layermoe_ds.io import sha256_file
from layermoe_testbed.corpus import CorpusOptions, corpus_is_built, select_paragraphs, split_of

LONG = "a paragraph long enough to keep"


def test_split_is_deterministic_and_roughly_90_5_5():
    pages = [f"text/page{i}.html" for i in range(20000)]
    counts = Counter(split_of(p) for p in pages)
    assert [split_of(p) for p in pages[:50]] == [split_of(p) for p in pages[:50]]
    assert 0.88 < counts["train"] / 20000 < 0.92
    assert 0.04 < counts["valid"] / 20000 < 0.06
    assert 0.04 < counts["test"] / 20000 < 0.06


def _page_in(split: str) -> str:
    return next(f"text/p{i}.html" for i in range(1000) if split_of(f"text/p{i}.html") == split)


def test_select_drops_short_untranslated_latin_and_duplicates():
    train, test = _page_in("train"), _page_in("test")
    pages = {
        "en": {
            train: {"k1": "Open the file menu to begin.", "k2": "short"},
            test: {"k3": "Open the file menu to begin."},
        },
        "ru": {
            train: {"k1": "Откройте меню файла, чтобы начать.", "k2": "LibreOffice Calc Writer Impress Draw"},
            test: {"k3": "Откройте меню файла, чтобы начать.", "k4": "Это тестовый абзац, он остаётся."},
        },
        "de": {train: {"k1": "Open the file menu to begin."}},
    }
    out = select_paragraphs(pages, ["en", "ru", "de"], CorpusOptions(langs=("en", "ru", "de")))
    assert out["en"] == {"train": ["Open the file menu to begin."], "valid": [], "test": []}
    assert out["ru"]["train"] == ["Откройте меню файла, чтобы начать."]
    assert out["ru"]["test"] == ["Это тестовый абзац, он остаётся."]  # the duplicate of a train paragraph is gone
    assert out["de"]["train"] == []  # identical to English: untranslated


def test_options_validate():
    with pytest.raises(ValueError, match="unknown language"):
        CorpusOptions(langs=("en", "xx"))
    with pytest.raises(ValueError, match="max_pages"):
        CorpusOptions(max_pages=0)


def test_corpus_slice_is_parallel_split_and_described(corpus_dir):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["license"] == "MPL-2.0"
    assert (corpus_dir / manifest["license_notice"]).read_text().startswith("Text extracted")
    assert set(manifest["packages"]) >= {"en", "de", "fr", "ru", "el"}
    for name, meta in manifest["files"].items():
        assert sha256_file(corpus_dir / name) == meta["sha256"]
        assert meta["paragraphs"] > 0
    for lang in ("en", "de", "fr", "ru", "el"):
        train = set((corpus_dir / f"{lang}.train.txt").read_text().splitlines())
        for split in ("valid", "test"):
            held_out = (corpus_dir / f"{lang}.{split}.txt").read_text().splitlines()
            assert not train & set(held_out)
            assert all(unicodedata.is_normalized("NFC", line) and line == line.strip() for line in held_out)
    # parallel: the held-out splits hold about as many paragraphs in every language (same pages)
    test_sizes = [manifest["files"][f"{lang}.test.txt"]["paragraphs"] for lang in ("en", "de", "fr", "el")]
    assert max(test_sizes) < 1.5 * min(test_sizes)
    assert corpus_is_built(corpus_dir, CorpusOptions(langs=("en", "de", "fr", "ru", "el"), max_pages=300))
    assert not corpus_is_built(corpus_dir, CorpusOptions(langs=("en", "de", "fr", "ru", "el"), max_pages=301))


def test_non_latin_languages_are_mostly_in_their_script(corpus_dir):
    from layermoe_testbed.help_html import latin_fraction

    for lang in ("ru", "el"):
        lines = (corpus_dir / f"{lang}.train.txt").read_text().splitlines()
        assert all(latin_fraction(line) <= 0.5 for line in lines)


def test_data_build_default_is_the_demo_corpus():
    """`layermoe data build` with no --langs builds what `make demo` builds (so the demo reuses it)."""
    from layermoe_testbed.corpus import DEFAULT_LANGS
    from layermoe_testbed.pretrain import LATER_LANGS, OLD_LANGS

    assert DEFAULT_LANGS == OLD_LANGS + LATER_LANGS
