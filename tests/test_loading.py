import json

import pytest

from layermoe_ds.data.loading import available_languages, iter_documents
from layermoe_ds.data.streams import open_streams
from tests.helpers import CharTokenizer


def load_texts(data, langs, split):
    """Every document of `langs` as a run reads it: through the token cache (the errors under test come from
    there), decoded back from the character tokens, checked against the plain streaming reader."""
    tokenizer = CharTokenizer(vocab=1 << 17)
    out = {}
    for lang, stream in open_streams(data, tokenizer, data, langs, split).items():
        lengths, _ = stream.document_lengths()
        ends = lengths.cumsum()
        ids = stream.read(0, stream.num_tokens)
        out[lang] = ["".join(map(chr, ids[end - length : end - 1])) for length, end in zip(lengths, ends, strict=True)]
        assert out[lang] == list(iter_documents(data, lang, split))
    return out


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)


def test_directory_of_txt_and_jsonl(tmp_path):
    _write(tmp_path / "en.train.txt", "one\n\ntwo\n")
    _write(tmp_path / "xx.train.jsonl", json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    _write(tmp_path / "README.md", "ignored")
    assert set(available_languages(tmp_path)) == {"en", "xx"}
    assert load_texts(tmp_path, ["en", "xx"], "train") == {"en": ["one", "two"], "xx": ["alpha", "beta"]}


def test_single_jsonl_with_lang_and_split(tmp_path):
    rows = [{"text": "a", "lang": "en"}, {"text": "b", "lang": "ru", "split": "test"}, {"text": "c", "lang": "en"}]
    _write(tmp_path / "all.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_texts(tmp_path / "all.jsonl", ["en"], "train") == {"en": ["a", "c"]}
    assert load_texts(tmp_path / "all.jsonl", ["ru"], "test") == {"ru": ["b"]}


def test_unknown_language_lists_those_found(tmp_path):
    _write(tmp_path / "en.train.txt", "x\n")
    with pytest.raises(ValueError, match=r"\['fr'\] not found .*found: \['en'\]"):
        load_texts(tmp_path, ["fr"], "train")


def test_missing_split_is_named(tmp_path):
    _write(tmp_path / "en.train.txt", "x\n")
    with pytest.raises(FileNotFoundError, match="no test split for language 'en'"):
        load_texts(tmp_path, ["en"], "test")


def test_non_utf8_file_is_named_with_line(tmp_path):
    _write(tmp_path / "de.train.txt", "gut\nÄrger\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"de.train.txt: not UTF-8 .*line 2"):
        load_texts(tmp_path, ["de"], "train")


def test_empty_language_is_an_error(tmp_path):
    _write(tmp_path / "el.valid.txt", "\n  \n")
    with pytest.raises(ValueError, match="'el' has no text in its valid split"):
        load_texts(tmp_path, ["el"], "valid")


def test_bad_jsonl_line_is_named(tmp_path):
    _write(tmp_path / "en.train.jsonl", '{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"en.train.jsonl:2: the text field 'text' must be a string, found a int"):
        load_texts(tmp_path, ["en"], "train")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "nope", ["en"], "train")


def test_a_bad_split_in_a_mixed_jsonl_names_the_line(tmp_path):
    _write(tmp_path / "all.jsonl", '{"text": "a", "lang": "en"}\n{"text": "b", "lang": "en", "split": "dev2"}\n')
    with pytest.raises(ValueError, match=r"all.jsonl:2: split 'dev2' is not one of"):
        load_texts(tmp_path / "all.jsonl", ["en"], "train")
