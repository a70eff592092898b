"""The bad-input matrix (docs/troubleshooting.md): every case is one line naming the culprit, a non-zero exit before
any work, and no existing file touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, base_config, launch_in_process

SIMILARITY = {"layer_score": [0.3, 0.5, 0.4], "num_layers": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_dir, tiny_base, upcycled) -> dict[str, Path]:
    """Broken and good inputs side by side."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    for name, damage in (("empty_data", b""), ("binary_data", b"ok line\n\xff\xfe not utf-8\n")):
        shutil.copytree(corpus_dir, tmp / name)
        (tmp / name / "fr.test.txt").write_bytes(damage)
    from layermoe_ds.data.loading import raw_sources
    from layermoe_ds.data.prepare import tokenize
    from layermoe_ds.data.tokens import MANIFEST

    good = tmp_path_factory.mktemp("prepared") / "good"
    tokenize(raw_sources(corpus_dir, ["en", "fr"], ["test"]), tiny_base, good, progress=False)
    for name in ("other_tokenizer", "truncated_shard", "corrupt_shard"):
        shutil.copytree(good, tmp / name)
    manifest = json.loads((good / MANIFEST).read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 16  # as if prepared with another tokenizer
    (tmp / "other_tokenizer" / MANIFEST).write_text(json.dumps(manifest))
    shard = tmp / "truncated_shard" / manifest["streams"]["fr"]["test"]["shards"][0]["bin"]
    shard.write_bytes(shard.read_bytes()[:-2])
    shard = tmp / "corrupt_shard" / manifest["streams"]["en"]["test"]["shards"][0]["bin"]
    shard.write_bytes(b"\xff\xff" * 4 + shard.read_bytes()[8:])
    (tmp / "no_weights").mkdir()
    shutil.copy(tiny_base / "config.json", tmp / "no_weights" / "config.json")
    shutil.copytree(tiny_base, tmp / "truncated_weights")
    weights = tmp / "truncated_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    shutil.copytree(tiny_base, tmp / "gpt2")
    config = json.loads((tiny_base / "config.json").read_text())
    (tmp / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]}))
    (tmp / "broken.json").write_text('{"layer_score": [0.3, 0.5,')
    (tmp / "similarity.json").write_text(json.dumps(SIMILARITY))
    (tmp / "no_scores.json").write_text(json.dumps({"num_layers": 3}))
    (tmp / "alloc_5_layers.json").write_text(json.dumps({"experts_per_layer": [2] * 5, "classifier_layers": [0]}))
    (tmp / "hostfile").write_text("node-01 slots=8\nnode-02 slots=eight\n")
    (tmp / "ds_broken.json").write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    (tmp / "ds_zero3.json").write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
    )
    (tmp / "ds_optimizer.json").write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    )
    (tmp / "other_run").mkdir()
    (tmp / "other_run" / "resolved_config.json").write_text(
        json.dumps({"stage": 1, "fingerprint": "0123456789abcdef", "train": {"steps": 999}, "deepspeed": {}})
    )
    (tmp / "pretrain.yaml").write_text("stpes: 10\n")
    (tmp / "out_dir").mkdir()
    (tmp / "out_dir" / "keep.txt").write_text("a previous result")
    (tmp / "existing.json").write_text('{"a previous": "result"}')
    return {"tmp": tmp, "corpus": corpus_dir, "base": tiny_base, "moe": upcycled}


def cli_cases(i: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    t, base, corpus, moe = i["tmp"], str(i["base"]), str(i["corpus"]), str(i["moe"])
    evaluate = ["evaluate", "--model", base, "--langs", "en,fr", "--old", "en"]
    profile = ["profile", "--model", base, "--data", corpus, "--old", "en,de", "--new", "fr", "--out"]
    allocate = ["allocate", "--similarity", str(t / "similarity.json"), "--out", str(t / "existing.json")]
    return [
        ("data dir missing", [*evaluate, "--data", str(t / "nowhere")], "nowhere"),
        ("data file empty (a language with no text)", [*evaluate, "--data", str(t / "empty_data")], "fr"),
        ("data file not UTF-8", [*evaluate, "--data", str(t / "binary_data")], "fr.test.txt"),
        ("language not in the data", [*evaluate[:4], "en,xx", "--data", corpus], "xx"),
        (
            "prepared data from another tokenizer",
            [*evaluate, "--data", str(t / "other_tokenizer")],
            "was tokenized with another tokenizer",
        ),  # fmt: skip
        ("token shard truncated", [*evaluate, "--data", str(t / "truncated_shard")], "fr.test.00001.bin: "),
        ("token shard corrupt", [*evaluate, "--data", str(t / "corrupt_shard")], "en.test.00000.bin: token id 65535"),
        (
            "tokenize a non-UTF-8 file",
            [
                "data",
                "tokenize",
                "--data",
                str(t / "binary_data"),
                "--tokenizer",
                base,
                "--out",
                str(t.parent / "tok"),
                "--langs",
                "fr",
                "--splits",
                "test",
            ],
            "fr.test.txt: not UTF-8 (byte 8, line 2)",
        ),  # fmt: skip
        (
            "model without weights",
            [*profile[:2], str(t / "no_weights"), *profile[3:], str(t / "existing.json")],
            "no weights",
        ),  # fmt: skip
        (
            "a model that cannot be expanded",
            [
                "upcycle",
                "--model",
                str(t / "gpt2"),
                "--allocation",
                str(t / "alloc_5_layers.json"),
                "--out",
                str(t / "new_model"),
            ],
            "architecture 'gpt2' (GPT2LMHeadModel): no decoder layers at model.layers",
        ),  # fmt: skip
        (
            "model weights truncated (an interrupted copy)",
            [*evaluate[:2], str(t / "truncated_weights"), *evaluate[3:], "--data", corpus],
            "truncated_weights/model.safetensors is truncated: its tensors need",
        ),  # fmt: skip
        (
            "same language old and new",
            [*profile[:8], "en", *profile[9:], str(t / "existing.json")],
            "are in both --old and --new",
        ),
        (
            "malformed similarity JSON",
            [*allocate[:1], "--similarity", str(t / "broken.json"), *allocate[3:], "--budget", "9"],
            "broken.json is not valid JSON",
        ),  # fmt: skip
        (
            "similarity JSON without scores",
            [*allocate[:1], "--similarity", str(t / "no_scores.json"), *allocate[3:], "--budget", "9"],
            "no_scores.json",
        ),  # fmt: skip
        ("budget < layers", [*allocate, "--budget", "2"], "budget"),
        ("K > layers", [*allocate, "--budget", "9", "--classifier-layers", "5"], "classifier"),
        (
            "malformed allocation JSON",
            ["upcycle", "--model", base, "--allocation", str(t / "broken.json"), "--out", str(t / "new_model")],
            "broken.json is not valid JSON",
        ),  # fmt: skip
        (
            "allocation for another model",
            ["upcycle", "--model", base, "--allocation", str(t / "alloc_5_layers.json"), "--out", str(t / "new_model")],
            "5",
        ),  # fmt: skip
        (
            "output dir not empty",
            ["upcycle", "--model", base, "--allocation", str(t / "alloc_5_layers.json"), "--out", str(t / "out_dir")],
            "out_dir already exists",
        ),  # fmt: skip
        (
            "unknown pretrain key",
            [
                "pretrain",
                "--config",
                str(t / "pretrain.yaml"),
                "--data",
                corpus,
                "--tokenizer",
                base,
                "--out",
                str(t / "new_model"),
            ],
            "did you mean 'steps'",
        ),  # fmt: skip
        ("hostfile bad line", ["check-hostfile", str(t / "hostfile")], "line 2: 'node-02 slots=eight'"),
        (
            "export from a non-checkpoint",
            ["export", "--checkpoint", moe, "--out", str(t / "new_model")],
            "neither a complete checkpoint",
        ),  # fmt: skip
    ]


def stage_cases(i: dict[str, Path]) -> list[tuple[str, dict, str, str]]:
    t = i["tmp"]
    good = base_config(i["moe"], i["corpus"], t / "new_run", steps=2)
    return [
        ("unknown run-config key", {**good, "stpes": 3}, "stage1_zero2.json", "did you mean 'steps'"),
        ("ZeRO-3 with MoE", good, str(t / "ds_zero3.json"), "ZeRO Stage 3"),
        ("optimizer in the DeepSpeed JSON", good, str(t / "ds_optimizer.json"), "optimizer"),
        ("malformed DeepSpeed JSON", good, str(t / "ds_broken.json"), "ds_broken.json"),
        (
            "ep_size not dividing experts",
            {**good, "expert_parallel_size": "2"},
            "stage1_zero2.json",
            "expert_parallel_size: 2 does not divide",
        ),  # fmt: skip
        (
            "run dir holds another run",
            {**good, "out": str(t / "other_run")},
            "stage1_zero2.json",
            "already holds a different run",
        ),  # fmt: skip
        (
            "language missing from the data",
            {**good, "language_groups": [["en"], ["xx"]]},
            "stage1_zero2.json",
            "['xx'] not found",
        ),  # fmt: skip
        (
            "language groups not the model's",
            {**good, "language_groups": [["en", "de"], ["fr"], ["ru"]]},
            "stage1_zero2.json",
            "the model knows 2",
        ),  # fmt: skip
        ("full fine-tune of a LayerMoE model", {**good, "full_finetune": True}, "stage1_zero2.json", "is a LayerMoE"),
        (
            "full fine-tune with an allocation",
            {**good, "model": str(i["base"]), "allocation": str(t / "alloc_5_layers.json"), "full_finetune": True},
            "stage1_zero2.json",
            "train.full_finetune: trains the dense model itself; remove train.allocation",
        ),  # fmt: skip
        ("unknown choice", {**good, "resume": "maybe"}, "stage1_zero2.json", "train.resume: 'maybe' is not one of"),
    ]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def one_error_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_bad_inputs(inputs, capsys):
    from layermoe_ds.cli import main

    cases = cli_cases(inputs)
    assert len(cases) + len(stage_cases(inputs)) >= 20
    before = snapshot(inputs["tmp"])
    for name, argv, culprit in cases:
        code = main(argv)
        line = one_error_line(capsys.readouterr().err, f"layermoe {argv[0]}: error")
        assert code == 2 and culprit in line, f"{name}: {line}"
        assert snapshot(inputs["tmp"]) == before, f"{name} touched a file"


def test_training_bad_inputs(inputs, single_rank, capsys):
    before = snapshot(inputs["tmp"])
    for name, config, ds_json, culprit in stage_cases(inputs):
        code, err = launch_in_process(1, config, inputs["tmp"], ds_json, capsys)
        line = one_error_line(err, "stage1: error")
        assert code == 2 and culprit in line, f"{name}: {line}"
        assert not (inputs["tmp"] / "new_run" / "checkpoints").exists(), name
        after = snapshot(inputs["tmp"])
        assert {k: v for k, v in after.items() if k != "run.yaml"} == {
            k: v for k, v in before.items() if k != "run.yaml"
        }, f"{name} touched a file"


def test_readme_lists_every_case(inputs):
    readme = (ROOT / "docs" / "troubleshooting.md").read_text()
    for name, *_ in cli_cases(inputs) + stage_cases(inputs):
        assert f"| {name} |" in readme, f"docs/troubleshooting.md lacks '{name}'"
