"""`layermoe evaluate`: dense and LayerMoE models, routing statistics, reproducibility, every token scored."""

from __future__ import annotations

import json

import pytest

from layermoe_ds.cli import main

LANGS = ["en", "de", "fr", "ru"]


def evaluate(model, corpus, out, *extra) -> dict:
    argv = ["evaluate", "--model", str(model), "--data", str(corpus), "--langs", ",".join(LANGS), "--old", "en,de"]
    assert main([*argv, "--max-tokens", "600", "--seq-len", "32", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_dense_model_has_losses_and_no_routing(tiny_base, corpus_dir, tmp_path):
    report = evaluate(tiny_base, corpus_dir, tmp_path / "e.json")
    assert set(report["languages"]) == set(LANGS) and "routing" not in report
    assert report["groups"] == {"en": 0, "de": 0, "fr": 1, "ru": 1}
    assert report["old_avg"]["loss"] < report["new_avg"]["loss"]  # the base model knows en+de


def test_layermoe_routing_statistics_are_complete_and_reproducible(upcycled, tiny_base, corpus_dir, tmp_path):
    report = evaluate(upcycled, corpus_dir, tmp_path / "a.json")
    again = evaluate(upcycled, corpus_dir, tmp_path / "b.json")
    assert report == again  # same model, same data → the same numbers
    dense = evaluate(tiny_base, corpus_dir, tmp_path / "d.json")
    for lang in LANGS:  # fresh experts are copies of the FFN: the upcycled model computes the dense function
        assert report["languages"][lang]["loss"] == pytest.approx(dense["languages"][lang]["loss"], abs=1e-4)
    layers = report["routing"]["layers"]
    assert set(layers) == {"0", "1", "2"}
    for layer, row in layers.items():
        for lang in LANGS:
            assert row["tokens"][lang] == report["languages"][lang]["tokens"]  # every scored token is routed
            assert 0.0 <= row["expert0_share"][lang] <= 1.0
            assert sum(row["expert_load"][lang]) == pytest.approx(1.0)
        assert ("classifier_accuracy" in row) == (layer in ("0", "2"))  # the fixture's classifier layers
    assert set(report["routing"]["old_to_expert0"]) == {"0", "1", "2"}


def test_lifelong_groups_and_bad_groups(upcycled, corpus_dir, tmp_path, capsys):
    report = evaluate(upcycled, corpus_dir, tmp_path / "g.json", "--groups", "en,de;fr;ru")
    assert report["groups"] == {"en": 0, "de": 0, "fr": 1, "ru": 2}
    argv = ["evaluate", "--model", str(upcycled), "--data", str(corpus_dir), "--langs", "en,fr", "--groups", "en;de"]
    assert main(argv) == 2
    assert "['fr'] are evaluated but in no group" in capsys.readouterr().err
