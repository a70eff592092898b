"""lm-evaluation-harness (the `[eval]` extra) on local held-out tasks: a dense model and a LayerMoE export loaded
through `trust_remote_code`, offline."""

from __future__ import annotations

import json

import pytest

from layermoe_ds.cli import main


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def harness_bpb(model_dir, tasks_dir, limit: int) -> tuple[dict[str, float], object]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layermoe_ds.eval.lm_harness import GROUP

    lm = HFLM(pretrained=str(model_dir), trust_remote_code=True, device="cpu", batch_size=8, max_length=32)
    results = simple_evaluate(
        model=lm, tasks=[GROUP], task_manager=TaskManager(include_path=str(tasks_dir)), limit=limit
    )["results"]
    return {name: row["bits_per_byte,none"] for name, row in results.items() if name != GROUP}, lm


@pytest.mark.slow
def test_local_tasks_run_on_dense_and_layermoe_models(tiny_base, upcycled, corpus_dir, tmp_path, capsys):
    from layermoe_ds.data.loading import iter_documents
    from layermoe_ds.data.streams import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.eval.evaluate import evaluate_model
    from layermoe_ds.eval.lm_harness import task_name
    from layermoe_ds.hf.load import load_causal_lm

    tasks = tmp_path / "tasks"
    assert main(["lm-eval-tasks", "--data", str(corpus_dir), "--langs", "en,fr", "--out", str(tasks)]) == 0
    assert f"--include_path {tasks}" in capsys.readouterr().out
    docs = [json.loads(line)["text"] for line in (tasks / "fr.test.jsonl").read_text().splitlines()]
    assert docs == list(iter_documents(corpus_dir, "fr", "test"))

    dense, _ = harness_bpb(tiny_base, tasks, limit=24)
    moe, lm = harness_bpb(upcycled, tasks, limit=24)
    assert type(lm.model).__module__.startswith("transformers_modules")  # the exported remote code, not ours
    assert set(dense) == {task_name("en"), task_name("fr")}
    # Fresh experts are copies of the FFN: through the harness too, the upcycled model is the dense function.
    for name, value in dense.items():
        assert moe[name] == pytest.approx(value, rel=1e-4)
    # The harness scores documents one by one (rolling windows), `layermoe evaluate` packs them into blocks: close,
    # not equal; and the model knows English better than French either way.
    ours = {}
    for lang in ("en", "fr"):
        tokenizer = load_tokenizer(tiny_base)
        streams = open_streams(corpus_dir, tokenizer, tiny_base, [lang], "test")
        first_24 = streams[lang].documents_prefix(24)[0]  # the harness's limit: the first 24 documents
        report = evaluate_model(
            load_causal_lm(tiny_base), tokenizer, streams, {lang: 0}, seq_len=32, max_tokens=first_24
        )
        ours[lang] = report["languages"][lang]["bpb"]
        assert dense[task_name(lang)] == pytest.approx(ours[lang], rel=0.02)  # measured: 0.3% apart
    assert dense[task_name("en")] < dense[task_name("fr")] and ours["en"] < ours["fr"]


@pytest.mark.slow
def test_the_documented_command_line_runs(upcycled, corpus_dir, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path TASKS …`, as printed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from layermoe_ds.eval.lm_harness import GROUP, command, write_tasks

    tasks = tmp_path / "tasks"
    write_tasks(corpus_dir, ["en"], tasks)
    argv = command(upcycled, tasks).split()
    assert argv[0] == "lm_eval" and f"pretrained={upcycled},trust_remote_code=True" in argv
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    extra = ["--limit", "4", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([lm_eval, *argv[1:], *extra], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{GROUP}_en" in result.stdout and "bits_per_byte" in result.stdout


def test_task_writer_errors_name_the_language(corpus_dir, tmp_path, capsys):
    assert main(["lm-eval-tasks", "--data", str(corpus_dir), "--langs", "en,xx", "--out", str(tmp_path / "t")]) == 2
    assert "['xx'] not found" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
