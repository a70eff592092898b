"""`layermoe benchmark`: the paper suite's plan against the reference protocol, and a whole run through
lm-evaluation-harness on local snapshots in each benchmark's schema (offline: `--datasets`)."""

from __future__ import annotations

import json

import pytest

from layermoe_ds.cli import main

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_the_paper_suite_plans_the_reference_protocol(manager, tmp_path, capsys):
    """XZhang00/LayerMoE's eval script: ARC 25-shot, HellaSwag 10-shot, MMLU 5-shot (cmmlu for zh, mmlu_tr 4-shot),
    Belebele 5-shot in FLORES-200 codes; what upstream lm-eval lacks (el, tr) is listed as missing."""
    argv = ["benchmark", "--model", "unused", "--old", "en,zh,es", "--new", "el,hu,tr", "--out", str(tmp_path)]
    assert main([*argv, "--dry-run"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    tasks = {lang: {row["task"]: row["num_fewshot"] for row in rows} for lang, rows in report["plan"].items()}
    assert tasks["en"] == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "belebele_eng_Latn": 5}
    assert tasks["zh"] == {"arc_zh": 25, "cmmlu": 5, "belebele_zho_Hans": 5}
    assert tasks["hu"] == {"arc_hu": 25, "hellaswag_hu": 10, "m_mmlu_hu": 5, "belebele_hun_Latn": 5}
    assert tasks["el"] == {"belebele_ell_Grek": 5} and tasks["tr"] == {"belebele_tur_Latn": 5}
    missing = {lang: {row["benchmark"]: row["looked_for"] for row in rows} for lang, rows in report["missing"].items()}
    flores = {"flores": ["--flores DIR (the FLORES-101/200 dev and devtest files)"]}  # translation needs its data
    assert missing == {
        "zh": {"hellaswag": ["hellaswag_zh"], **flores},
        "es": flores,
        "el": {"arc": ["arc_el"], "hellaswag": ["hellaswag_el"], "mmlu": ["mmlu_el"], **flores},
        "hu": flores,
        "tr": {"arc": ["arc_tr"], "hellaswag": ["hellaswag_tr"], "mmlu": ["mmlu_tr"], **flores},
    }
    assert "scores" not in report and "belebele_ell_Grek (5-shot)" in capsys.readouterr().out


def test_custom_tasks_fill_the_gaps_and_bad_input_is_named(tmp_path, capsys):
    """A task YAML of your own (here Turkish MMLU under the reference's name, 4-shot) is found with --include-path;
    `--tasks` adds one per language."""
    include = tmp_path / "tasks"
    include.mkdir()
    for name in ("mmlu_tr", "my_mc_el", "my_mc_tr"):
        (include / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: local/{name}\noutput_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
        )
    argv = ["benchmark", "--model", "unused", "--old", "en", "--new", "el,tr", "--out", str(tmp_path / "o")]
    assert main([*argv, "--include-path", str(include), "--tasks", "my_mc_{lang}:3", "--dry-run"]) == 0
    plan = json.loads((tmp_path / "o" / "results.json").read_text())["plan"]
    assert {"benchmark": "mmlu", "task": "mmlu_tr", "num_fewshot": 4} in plan["tr"]
    assert {"benchmark": "my_mc_{lang}", "task": "my_mc_el", "num_fewshot": 3} in plan["el"]
    missing = json.loads((tmp_path / "o" / "results.json").read_text())["missing"]
    assert {"benchmark": "my_mc_{lang}", "looked_for": ["my_mc_en"]} in missing["en"]
    assert main([*argv, "--tasks", "my_mc", "--dry-run"]) == 2
    assert "--tasks: 'my_mc' has no {lang}" in capsys.readouterr().err
    assert main([*argv[:4], "en,el", *argv[5:], "--dry-run"]) == 2
    assert "['el'] are in both --old and --new" in capsys.readouterr().err
    assert main([*argv, "--limit", "0"]) == 2
    assert "benchmark.limit: 0 must be >= 1" in capsys.readouterr().err


def test_a_whole_run_offline_scores_every_language_and_averages_the_groups(
    manager, upcycled, tmp_path, capsys, monkeypatch
):
    import datasets

    from layermoe_ds.eval.task_data import leaf_configs
    from tests.benchmark_fixtures import write_snapshots

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")  # no other run's tables

    subjects = sorted({c["dataset_name"] for c in leaf_configs(manager.task_index, "mmlu")})
    assert len(subjects) == 57
    snapshots = tmp_path / "hub"
    write_snapshots(snapshots, subjects, ["fr", "ru"], ["eng_Latn", "fra_Latn", "rus_Cyrl", "ell_Grek"])
    argv = ["benchmark", "--model", str(upcycled), "--old", "en", "--new", "fr,ru,el", "--out", str(tmp_path / "o")]
    argv += ["--datasets", str(snapshots), "--limit", "2", "--batch-size", "4"]
    # a snapshot that is not there: one line naming the repository and the command that fetches it, no model loaded
    (snapshots / "facebook" / "belebele").rename(snapshots / "elsewhere")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "facebook/belebele is missing" in err and "hf download facebook/belebele --repo-type dataset" in err
    (snapshots / "elsewhere").rename(snapshots / "facebook" / "belebele")

    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    scores = report["scores"]
    assert sorted(scores["en"]) == ["arc", "belebele", "hellaswag", "mmlu"]
    assert sorted(scores["fr"]) == sorted(scores["ru"]) == ["arc", "belebele", "hellaswag", "mmlu"]
    assert sorted(scores["el"]) == ["belebele"]
    assert [row["benchmark"] for row in report["missing"]["el"]] == ["arc", "hellaswag", "mmlu", "flores"]
    assert scores["en"]["arc"]["metric"] == "acc_norm" and scores["en"]["mmlu"]["metric"] == "acc"
    assert all(0.0 <= row["value"] <= 1.0 for lang in scores.values() for row in lang.values())
    for bench in ("arc", "belebele"):
        new = [scores[lang][bench]["value"] for lang in ("fr", "ru", "el") if bench in scores[lang]]
        assert report["new_avg"][bench] == pytest.approx(sum(new) / len(new))
        assert report["old_avg"][bench] == pytest.approx(scores["en"][bench]["value"])
    assert report["new_avg"]["all"] == pytest.approx(sum(v for k, v in report["new_avg"].items() if k != "all") / 4)
    # the tiny model's 64 positions: 25-shot ARC prompts overflow, and the report says how often
    assert report["max_length"] == 64 and report["over_context"]["arc_challenge"] == 2
    table = (tmp_path / "o" / "results.md").read_text()
    assert "| el | new |" in table and "Missing" in table and "64-token context" in table


def test_offline_without_datasets_is_one_line_before_the_model_loads(upcycled, tmp_path, capsys, monkeypatch):
    """An unreachable Hub (here a closed local port) and no --datasets: the datasets and the command that fetches
    them, in one line, and the model never loaded (lm-eval would end in a ConnectionError traceback after it)."""
    from huggingface_hub import constants

    from layermoe_ds.eval import benchmark

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(benchmark, "_harness_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["benchmark", "--model", str(upcycled), "--old", "en", "--new", "el", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("layermoe benchmark: error")]
    assert "Traceback" not in err and len(lines) == 1
    err = lines[0]
    assert "the Hub (http://127.0.0.1:9) cannot be reached" in err and "facebook/belebele" in err
    assert "--datasets DIR" in err and "hf download " in err
