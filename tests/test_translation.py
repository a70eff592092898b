"""FLORES translation in `layermoe benchmark --flores`: the paper's directions and prompt, files found under either
release's names, shots lowered (and counted) to fit a short context, chrF per direction, COMET's plumbing."""

from __future__ import annotations

import json
import sys
import types

import pytest

from layermoe_ds.cli import main
from layermoe_ds.eval import translation
from layermoe_ds.eval.translation import Direction, Translator

pytest.importorskip("lm_eval")


def write_flores(root, files: dict[str, str], sentences: int = 12) -> None:
    """A FLORES directory: `files` maps a language to its file stem (FLORES-200 or -101 name)."""
    words = {"en": "the house is red", "fr": "la maison est rouge", "de": "das Haus ist rot", "el": "το σπίτι είναι"}
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for lang, stem in files.items():
            lines = [f"{words[lang]} {i} {split}" for i in range(sentences)]
            (root / split / f"{stem}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_directions_prompt_and_file_names():
    assert [d.name for d in translation.directions(["en", "zh", "el"])] == ["en-zh", "zh-en", "en-el", "el-en"]
    assert translation.file_candidates("zh", "dev") == ["zho_Hans.dev", "zho_simpl.dev"]
    assert translation.file_candidates("el", "devtest") == ["ell_Grek.devtest", "ell.devtest"]
    assert translation.file_candidates("ell_Grek", "dev") == ["ell_Grek.dev"]
    text = translation.prompt(Direction("en", "el"), [("a b", "α β")], "c d")
    assert text == "Translation: English: a b Greek: α β\nTranslation: English: c d Greek: "
    assert translation.first_line(" κάτι εδώ\nTranslation: English: x") == "κάτι εδώ"
    assert translation.chrf(["the same words"], ["the same words"]) == pytest.approx(100.0)


def test_a_prompt_that_does_not_fit_drops_its_last_shots():
    class Words:  # a tokenizer counting words
        def __call__(self, text):
            return {"input_ids": text.split()}

    shots = [(f"s{i} x", f"t{i} y") for i in range(8)]
    translator = Translator(model=None, tokenizer=Words(), context=40, max_new_tokens=10)
    text, used = translator.fit(Direction("en", "fr"), shots, "source")
    assert used == 3 and "s2 x" in text and "s3 x" not in text  # 3 shots × 6 words + 6 + 10 new ≤ 40 < 4 shots
    with pytest.raises(ValueError, match="leaves no room for 10 new tokens in the model's 12-token context"):
        Translator(model=None, tokenizer=Words(), context=12, max_new_tokens=10).fit(Direction("en", "fr"), [], "s")


def test_flores_through_the_benchmark_verb(upcycled, tmp_path, capsys, monkeypatch):
    flores = tmp_path / "flores"
    write_flores(flores, {"en": "eng_Latn", "fr": "fra_Latn", "el": "ell"})  # two releases' names side by side
    out = tmp_path / "o"
    argv = ["benchmark", "--model", str(upcycled), "--old", "en,fr", "--new", "el", "--out", str(out)]
    argv += ["--suite", "none", "--flores", str(flores), "--limit", "2", "--beams", "2", "--flores-max-new-tokens", "6"]

    (flores / "devtest" / "ell.devtest").rename(flores / "elsewhere")  # a missing file: named, before any model
    assert main(argv) == 2
    assert "no devtest file for 'el': looked for" in capsys.readouterr().err
    (flores / "elsewhere").rename(flores / "devtest" / "ell.devtest")

    assert main([*argv, "--dry-run"]) == 0
    plan = json.loads((out / "results.json").read_text())["plan"]
    assert plan["el"] == [{"benchmark": "flores_from_en", "task": "en-el", "num_fewshot": 8},
                          {"benchmark": "flores_to_en", "task": "el-en", "num_fewshot": 8}]  # fmt: skip

    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["flores"]) == {"en-fr", "fr-en", "en-el", "el-en"}
    for lang in ("fr", "el"):
        assert sorted(report["scores"][lang]) == ["flores_from_en", "flores_to_en"]
        assert all(0 <= row["value"] <= 100 and row["metric"] == "chrf" for row in report["scores"][lang].values())
    assert report["old_avg"]["flores_to_en"] == pytest.approx(report["scores"]["fr"]["flores_to_en"]["value"])
    assert "all" not in report["old_avg"]  # translation's 0-100 scores are not averaged with accuracies
    # the tiny model's 64 positions hold fewer than 8 shots: every prompt was built with fewer, and counted
    assert all(row["shots_lowered"] == row["sentences"] == 2 for row in report["flores"].values())
    rows = [json.loads(line) for line in (out / "flores" / "en-el.jsonl").read_text().splitlines()]
    assert [row["ref"] for row in rows] == ["το σπίτι είναι 0 devtest", "το σπίτι είναι 1 devtest"]
    assert all("\n" not in row["mt"] for row in rows)
    assert "fewer shots to fit the 64-token context" in (out / "results.md").read_text()

    # COMET beside chrF where a checkpoint is given (the package's own scoring replaced: no model here)
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"")
    scored = []

    class Comet:
        def predict(self, rows, batch_size, gpus):
            scored.append(rows)
            return {"system_score": 0.5}

    monkeypatch.setitem(sys.modules, "comet", types.SimpleNamespace(load_from_checkpoint=lambda path: Comet()))
    assert main([*argv, "--comet", str(checkpoint)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["scores"]["el"]["flores_from_en (COMET)"] == {
        "metric": "comet", "value": 50.0, "task": "en-el", "num_fewshot": 8
    }  # fmt: skip
    assert len(scored) == 4 and set(scored[0][0]) == {"src", "mt", "ref"}
    assert main([*argv[:9], "--suite", "none", "--comet", str(checkpoint)]) == 2
    assert "--comet: scores translations; give --flores DIR as well" in capsys.readouterr().err
