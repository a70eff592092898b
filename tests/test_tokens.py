"""Prepared token data (data/prepare.py, data/tokens.py): what `layermoe data tokenize` writes, what the runs map,
and every way a prepared directory can be wrong."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from layermoe_ds.data import prepare
from layermoe_ds.data.loading import iter_documents, raw_sources
from layermoe_ds.data.prepare import tokenize
from layermoe_ds.data.streams import open_streams
from layermoe_ds.data.tokens import MANIFEST, PreparedData, tokenizer_fingerprint, verify
from layermoe_ds.io import sha256_file
from tests.helpers import GROUPS, CharTokenizer, base_config

LANGS = ["en", "fr"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from layermoe_ds.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def stream_ids(prepared: Path, tokenizer, tokenizer_dir, lang: str, split: str) -> np.ndarray:
    stream = open_streams(prepared, tokenizer, tokenizer_dir, [lang], split)[lang]
    return stream.read(0, stream.num_tokens)


def test_shards_hold_the_documents_tokens_whatever_the_workers_and_chunks(
    corpus_dir, tokenizer_dir, tokenizer, tmp_path
):
    sources = raw_sources(corpus_dir, LANGS, ["train", "test"])
    one = tokenize(sources, tokenizer_dir, tmp_path / "one", workers=1, progress=False)
    two = tokenize(sources, tokenizer_dir, tmp_path / "two", workers=2, chunk_bytes=40_000, progress=False)
    assert two["run"]["workers"] == 2 and len(two["streams"]["en"]["train"]["shards"]) > 3
    assert one["streams"]["en"]["train"]["shards"][0]["bin"].endswith(".bin")
    docs = list(iter_documents(corpus_dir, "fr", "test"))
    direct = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:  # the tokenizer as users call it
        direct += [*ids, tokenizer.eos_token_id]
    for lang in LANGS:
        for split in ("train", "test"):
            a = stream_ids(tmp_path / "one", tokenizer, tokenizer_dir, lang, split)
            b = stream_ids(tmp_path / "two", tokenizer, tokenizer_dir, lang, split)
            assert np.array_equal(a, b), (lang, split)
            entry = one["streams"][lang][split]
            assert entry == {**two["streams"][lang][split], "shards": entry["shards"]}  # counts agree
    assert stream_ids(tmp_path / "one", tokenizer, tokenizer_dir, "fr", "test").tolist() == direct
    stream = open_streams(tmp_path / "one", tokenizer, tokenizer_dir, ["fr"], "test")["fr"]
    assert stream.num_documents == len(docs)
    assert stream.num_bytes == sum(len(d.encode()) + 1 for d in docs)
    # The manifest: sources' sizes and checksums, the tokenizer, uint16 for a 1,000-piece vocabulary.
    assert one["dtype"] == "<u2" and one["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    for meta in one["sources"]:
        assert meta["sha256"] == sha256_file(Path(meta["path"])) and meta["size"] == Path(meta["path"]).stat().st_size
    assert one["totals"]["disk_bytes_per_token"] < 2.2
    assert verify(tmp_path / "two") == sum(len(e["shards"]) for s in two["streams"].values() for e in s.values())


def test_single_jsonl_language_filter_and_uint32(tmp_path):
    rows = [
        {"text": "hello", "lang": "en"},
        {"text": "bonjour", "lang": "fr", "split": "test"},
        {"text": "world", "lang": "en"},
        {"text": "ignored", "lang": "de"},
    ]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    big = CharTokenizer(vocab=70_000)
    sources = raw_sources(tmp_path / "all.jsonl", [], [])
    manifest = tokenize(sources, tmp_path, tmp_path / "p", langs=["en", "fr"], tokenizer=big, progress=False)
    assert manifest["dtype"] == "<u4" and sorted(manifest["streams"]) == ["en", "fr"]
    assert sorted(manifest["streams"]["fr"]) == ["test"]
    stream = open_streams(tmp_path / "p", big, tmp_path, ["en"], "train")["en"]
    assert stream.read(0, stream.num_tokens).tolist() == [*big.ids("hello"), 0, *big.ids("world"), 0]
    with pytest.raises(ValueError, match=r"languages \['xx'\] not found in .*all.jsonl; found: \['de', 'en', 'fr'\]"):
        tokenize(sources, tmp_path, tmp_path / "q", langs=["en", "xx"], tokenizer=big, progress=False)
    only_test = tokenize(sources, tmp_path, tmp_path / "t", splits=["test"], tokenizer=big, progress=False)
    assert {lang: sorted(splits) for lang, splits in only_test["streams"].items()} == {"fr": ["test"]}
    with pytest.raises(FileExistsError, match="other input"):
        tokenize(sources, tmp_path, tmp_path / "p", langs=["en"], tokenizer=big, progress=False)


def test_a_killed_run_reruns_reusing_finished_chunks(corpus_dir, tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    sources = raw_sources(corpus_dir, ["fr"], ["train"])
    reference = tokenize(sources, tokenizer_dir, tmp_path / "ref", chunk_bytes=100_000, progress=False)
    out = tmp_path / "killed"
    calls = []
    real = prepare.tokenize_chunk

    def dies_at_the_third_chunk(chunk, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        calls.append(chunk.number)
        return real(chunk, *args)

    monkeypatch.setattr(prepare, "tokenize_chunk", dies_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize(sources, tokenizer_dir, out, chunk_bytes=100_000, progress=False)
    assert not (out / MANIFEST).exists()  # never used half-done
    (out / "shards" / "fr.train.00002.bin.tmp").write_bytes(b"torn")
    monkeypatch.setattr(prepare, "tokenize_chunk", lambda chunk, *a: calls.append(chunk.number) or real(chunk, *a))
    manifest = tokenize(sources, tokenizer_dir, out, chunk_bytes=100_000, progress=False)
    assert calls[:2] == [0, 1] and 0 not in calls[2:] and 1 not in calls[2:]  # done chunks were not redone
    assert not list((out / "shards").glob("*.tmp"))
    assert manifest["streams"] == reference["streams"]
    rerun = tokenize(sources, tokenizer_dir, out, chunk_bytes=100_000, progress=False)
    assert rerun["up_to_date"] and rerun["run"] == manifest["run"]  # nothing tokenized again


@pytest.fixture()
def prepared(corpus_dir, tokenizer_dir, tmp_path) -> Path:
    tokenize(raw_sources(corpus_dir, ["fr"], ["test"]), tokenizer_dir, tmp_path / "p", progress=False)
    return tmp_path / "p"


def test_a_truncated_or_corrupt_shard_is_refused_naming_it(prepared, tokenizer, tokenizer_dir):
    shard = next((prepared / "shards").glob("*.bin"))
    data = shard.read_bytes()

    def first_read():
        stream = open_streams(prepared, tokenizer, tokenizer_dir, ["fr"], "test")["fr"]
        return stream.read(0, stream.num_tokens)

    shard.write_bytes(data[:-6])
    with pytest.raises(ValueError, match=rf"{shard}: \d+ bytes, the manifest says .* truncated"):
        first_read()
    shard.write_bytes(data[:100] + b"\xff\xff" + data[102:])
    with pytest.raises(ValueError, match=rf"{shard}: token id 65535 >= the vocabulary size 1000"):
        first_read()
    with pytest.raises(ValueError, match=rf"{shard}: SHA-256 differs"):
        verify(prepared)
    shard.write_bytes(data)
    index = next((prepared / "shards").glob("*.idx.npy"))
    index.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"{index}: unreadable document index"):
        open_streams(prepared, tokenizer, tokenizer_dir, ["fr"], "test")["fr"].document_lengths()


def test_another_tokenizer_is_refused(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"was tokenized with another tokenizer .* than this run's"):
        open_streams(prepared, CharTokenizer(), tmp_path, ["fr"], "test")


def test_raw_text_is_cached_once_per_file_and_shared_by_waiting_processes(tmp_path, monkeypatch):
    """Two 'ranks' ask at once: one tokenizes, the other waits on the lock and maps the same entry."""
    monkeypatch.setenv("LAYERMOE_DATA_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "en.train.txt").write_text("one two\nthree\n")
    (raw / "fr.train.txt").write_text("un deux\n")
    calls = []
    real = prepare.tokenize_chunk

    def slow(chunk, *args):
        calls.append(chunk.path)
        time.sleep(0.3)
        return real(chunk, *args)

    monkeypatch.setattr(prepare, "tokenize_chunk", slow)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(open_streams(raw, CharTokenizer(), raw, ["en", "fr"], "train")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(calls) == sorted([str(raw / "en.train.txt"), str(raw / "fr.train.txt")])  # once each
    assert [r["en"].read(0, 9).tolist() for r in results] == [CharTokenizer().ids("one two") + [0, 116]] * 2
    assert len(list((tmp_path / "cache").glob("*/token_manifest.json"))) == 2
    (raw / "en.train.txt").write_text("changed\n")  # a changed file is a new entry, never a stale one
    stream = open_streams(raw, CharTokenizer(), raw, ["en"], "train")["en"]
    assert stream.read(0, stream.num_tokens).tolist() == [*CharTokenizer().ids("changed"), 0]


def stage_config(data: Path, out: Path, **extra):
    from layermoe_ds.config import TrainConfig
    from layermoe_ds.data.stage_data import StageData

    config = TrainConfig(**{**base_config(Path("unused"), data, out), "language_groups": tuple(GROUPS), **extra})
    return StageData.of(config)


def test_stage_data_reads_only_what_it_uses_whatever_the_corpus_size(corpus_dir, tokenizer_dir, tokenizer, tmp_path):
    """Memory that does not grow with the corpus, counted: building the blocks reads no token, a batch reads its
    blocks' tokens and nothing else, at 1× and at 20× the text of the new languages."""
    from layermoe_ds.data.packing import BlockSampler
    from layermoe_ds.data.stage_data import stage_blocks

    big = tmp_path / "x20"
    shutil.copytree(corpus_dir, big)
    for lang in GROUPS[1]:
        text = (corpus_dir / f"{lang}.train.txt").read_bytes()
        (big / f"{lang}.train.txt").write_bytes(text * 20)
    read = {}
    for name, data in (("x1", corpus_dir), ("x20", big)):
        prepared = tmp_path / f"{name}_prepared"
        tokenize(raw_sources(data, [*GROUPS[0], *GROUPS[1]], ["train"]), tokenizer_dir, prepared, progress=False)
        blocks = stage_blocks(stage_config(prepared, tmp_path / name), 1, tokenizer, tokenizer_dir)
        streams = [part.stream for part in blocks.parts]
        assert sum(s.tokens_read for s in streams) == 0
        sampler = BlockSampler(len(blocks), 4, seed=0)
        for _ in range(5):
            ids, labels = blocks.batch(sampler.next_indices())
            assert ids.shape == (4, 32) and set(labels.tolist()) == {1}
        read[name] = sum(s.tokens_read for s in streams)
        # Stage 2's review set: the first N documents of every old and M of every new language, found through the
        # index alone.
        review = stage_blocks(
            stage_config(prepared, tmp_path / name, stage2_docs_per_old_lang=50, stage2_docs_per_new_lang=80),
            2,
            tokenizer,
            tokenizer_dir,
        )
        for part in review.parts:
            docs = 50 if part.label == 0 else 80
            assert part.blocks == part.stream.documents_prefix(docs)[0] // 32 and part.stream.tokens_read == 0
        assert [p.label for p in review.parts] == [0, 0, 1, 1, 1]
    assert read == {"x1": 5 * 4 * 32, "x20": 5 * 4 * 32}


def test_the_cli_tokenizes_verifies_and_is_a_no_op_when_up_to_date(corpus_dir, tokenizer_dir, tmp_path, capsys):
    from layermoe_ds.cli import main

    argv = ["data", "tokenize", "--data", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path)]
    assert main([*argv, "--langs", "ru,el", "--splits", "valid", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "ru       valid" in out and "bytes a token with the index" in out and "MB/s with 1 workers" in out
    assert main([*argv, "--langs", "ru,el", "--splits", "valid"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path)]) == 0
    assert "2 shards match the manifest" in capsys.readouterr().out
    assert PreparedData(tmp_path).languages() == {"el": ["valid"], "ru": ["valid"]}


def test_prepared_batches_equal_raw_batches(corpus_dir, tokenizer_dir, tokenizer, tmp_path):
    from layermoe_ds.data.stage_data import stage_blocks

    prepared = tmp_path / "p"
    tokenize(raw_sources(corpus_dir, GROUPS[1], ["train"]), tokenizer_dir, prepared, workers=2, progress=False)
    a = stage_blocks(stage_config(prepared, tmp_path / "a"), 1, tokenizer, tokenizer_dir)
    b = stage_blocks(stage_config(corpus_dir, tmp_path / "b"), 1, tokenizer, tokenizer_dir)
    assert len(a) == len(b)
    index = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:64]
    for x, y in zip(a.batch(index), b.batch(index), strict=True):
        assert torch.equal(x, y)


def test_a_spawned_tokenizer_worker_starts_without_transformers():
    """Workers import data/prepare.py; with a fast tokenizer they need only `tokenizers` (its docstring's promise)."""
    import subprocess
    import sys

    code = "import sys, layermoe_ds.data.prepare; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tokenizer_that_adds_a_bos_stores_each_document_as_bos_doc_eos(
    workers, corpus_dir, tokenizer_dir, tokenizer, tiny_base, tmp_path
):
    """Llama-3/Gemma style: every document starts with the BOS the model saw in pretraining. The convention is in
    the manifest and the fingerprint (the token cache makes new shards); evaluation scores no BOS, and lm-eval's
    documents decode without it."""
    from transformers import AutoTokenizer

    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.data.tokens import document_bos
    from layermoe_ds.eval.lm_harness import prepared_documents
    from layermoe_ds.eval.perplexity import language_nll
    from layermoe_ds.hf.load import load_causal_lm

    AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True).save_pretrained(tmp_path / "bos_tok")
    with_bos = load_tokenizer(tmp_path / "bos_tok")
    bos, eos = with_bos.bos_token_id, with_bos.eos_token_id
    assert document_bos(with_bos) == bos and document_bos(tokenizer) is None
    assert tokenizer_fingerprint(with_bos) != tokenizer_fingerprint(tokenizer)
    sources = raw_sources(corpus_dir, ["fr"], ["test"])
    manifest = tokenize(
        sources, tmp_path / "bos_tok", tmp_path / "p", workers=workers, tokenizer=with_bos, progress=False
    )
    assert manifest["tokenizer"]["bos_token_id"] == bos
    plain = tokenize(sources, tokenizer_dir, tmp_path / "q", tokenizer=tokenizer, progress=False)
    assert plain["tokenizer"]["bos_token_id"] is None
    ours = open_streams(tmp_path / "p", with_bos, tmp_path / "bos_tok", ["fr"], "test")["fr"]
    theirs = open_streams(tmp_path / "q", tokenizer, tokenizer_dir, ["fr"], "test")["fr"]
    lengths, _ = ours.document_lengths()
    assert ours.num_documents == theirs.num_documents and ours.num_tokens == theirs.num_tokens + ours.num_documents
    ids, starts = ours.read(0, ours.num_tokens), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert (ids[starts] == bos).all() and (ids[starts + lengths - 1] == eos).all()
    # Raw text through the token cache: the BOS convention's shards, not the plain tokenizer's.
    cached = open_streams(corpus_dir, with_bos, tmp_path / "bos_tok", ["fr"], "test")["fr"]
    assert np.array_equal(cached.read(0, cached.num_tokens), ids)
    if workers == 1:
        docs = list(prepared_documents(tmp_path / "p", "fr", "test", tmp_path / "bos_tok"))
        assert docs == list(prepared_documents(tmp_path / "q", "fr", "test", tokenizer_dir))
        model = load_causal_lm(tiny_base)
        first = int(theirs.document_lengths()[0][:5].sum())  # the same five documents, with and without BOS
        pairs = ((with_bos, ours, first + 5), (tokenizer, theirs, first))
        scored = [language_nll(model, t, s, 32, max_tokens=n) for t, s, n in pairs]
        assert scored[0]["bytes"] == scored[1]["bytes"]
        assert scored[0]["tokens"] == scored[1]["tokens"]  # each BOS read, never scored


def test_a_chosen_document_separator_ends_every_document_and_is_checked_on_use(
    corpus_dir, tokenizer_dir, tokenizer, tmp_path, caplog
):
    """`--doc-separator`: an Instruct tokenizer's EOS ends chat turns, so the separator of pretraining is chosen
    instead. The shards end each document with it, the manifest records it, the fingerprint tells the two apart, and
    evaluation starts the stream with it."""
    from layermoe_ds.data.tokens import chat_turn_eos

    sources = raw_sources(corpus_dir, ["fr"], ["test"])
    manifest = tokenize(sources, tokenizer_dir, tmp_path / "p", tokenizer=tokenizer, progress=False,
                        doc_separator="<pad>")  # fmt: skip
    pad = tokenizer.convert_tokens_to_ids("<pad>")
    assert manifest["tokenizer"]["doc_separator"] == {"token": "<pad>", "id": pad}
    assert manifest["plan"]["tokenizer"] == tokenizer_fingerprint(tokenizer, pad) != tokenizer_fingerprint(tokenizer)
    stream = open_streams(tmp_path / "p", tokenizer, tokenizer_dir, ["fr"], "test")["fr"]
    plain = tokenize(sources, tokenizer_dir, tmp_path / "q", tokenizer=tokenizer, progress=False)
    theirs = open_streams(tmp_path / "q", tokenizer, tokenizer_dir, ["fr"], "test")["fr"]
    lengths, _ = stream.document_lengths()
    ids, ends = stream.read(0, stream.num_tokens), np.cumsum(lengths) - 1
    assert stream.separator == pad and theirs.separator is None and plain["tokenizer"].get("doc_separator") is None
    assert (ids[ends] == pad).all() and (ids == tokenizer.eos_token_id).sum() == 0
    swapped = theirs.read(0, theirs.num_tokens).copy()
    swapped[ends] = pad
    assert np.array_equal(ids, swapped)  # the same documents, only the separator differs
    with pytest.raises(ValueError, match=r"--doc-separator: '<\|endoftext\|>' is not a token of this tokenizer"):
        tokenize(sources, tokenizer_dir, tmp_path / "r", tokenizer=tokenizer, doc_separator="<|endoftext|>")
    # An Instruct tokenizer: the EOS is the chat template's end of turn, and tokenizing without a separator warns.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    try:
        assert chat_turn_eos(tokenizer)
        with caplog.at_level("WARNING"):
            tokenize(sources, tokenizer_dir, tmp_path / "s", tokenizer=tokenizer, progress=False)
        assert "ends the turns of its chat template" in caplog.text and "--doc-separator" in caplog.text
    finally:
        tokenizer.chat_template = None
