"""Stage 1 and stage 2 on DeepSpeed with 2 CPU ranks (gloo), started through the real `deepspeed` launcher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import base_config, launch_in_process, metrics, new_expert, run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def stage1_run(upcycled, corpus_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("stage1")
    run(1, base_config(upcycled, corpus_dir, tmp / "run"), tmp, "stage1_zero2.json")
    return tmp / "run"


def test_stage1_zero2_expert_parallel_learns_and_freezes(stage1_run, upcycled):
    records = metrics(stage1_run)
    first = sum(records[s]["loss/ntp"] for s in range(1, 6)) / 5
    last = sum(records[s]["loss/ntp"] for s in range(26, 31)) / 5
    assert last < first - 0.05, (first, last)
    resolved = json.loads((stage1_run / "resolved_config.json").read_text())
    assert resolved["ep_sizes"] == {"0": 2, "1": 1, "2": 2} and resolved["world_size"] == 2
    assert "moe/layer_00/expert_load/02" in records[1] and "routing/layer_00/old_to_expert0" not in records[1]
    assert list((stage1_run / "tb").glob("events.out.tfevents.*"))
    before = load_file(upcycled / "model.safetensors")
    after = load_file(stage1_run / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        trained = ".router." in key or new_expert(key)
        if trained:
            assert not torch.equal(before[key], after[key]), f"{key} did not change"
        else:
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    config = json.loads((stage1_run / "model" / "config.json").read_text())
    assert config["classifier_routing"] is False


def test_what_a_run_writes_is_readable_to_the_team_and_keeps_the_generation_settings(stage1_run, tmp_path):
    """Every file and directory of the run (checkpoints, export, logs) is as readable to the group and others as
    the umask allows (the launched ranks inherit it), and the export, the checkpoints and `export --checkpoint`
    carry the base's generation_config.json."""
    import stat

    from transformers import GenerationConfig

    from layermoe_ds.cli import main
    from layermoe_ds.io import current_umask

    mask = current_umask()
    for path in [stage1_run, *stage1_run.rglob("*")]:
        shared = 0o055 if path.is_dir() else 0o044  # what the group and others may read (and enter)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & shared == shared & ~mask, (path, oct(mode))
    assert main(["export", "--checkpoint", str(stage1_run), "--out", str(tmp_path / "from_checkpoint")]) == 0
    checkpoints = [p for p in (stage1_run / "checkpoints").iterdir() if p.is_dir()]
    for directory in [stage1_run / "model", tmp_path / "from_checkpoint", *checkpoints]:
        assert GenerationConfig.from_pretrained(directory).max_new_tokens == 77, directory


def test_bf16_stage1_with_two_experts_a_rank_trains_and_reduces_gradients_in_fp32(upcycled_wide, corpus_dir, tmp_path):
    """The shipped ZeRO-2 config as a GPU run uses it (bf16 weights, fp32 gradient communication), on 2 CPU ranks,
    with a dense layer and two experts a rank in layer 0."""
    (tmp_path / "bf16.json").write_text(json.dumps({"bf16": {"enabled": True}}))
    config = base_config(upcycled_wide, corpus_dir, tmp_path / "run", steps=10, save_every=10, log_every=1)
    run(1, config, tmp_path, "stage1_zero2.json", extra_json=[tmp_path / "bf16.json"])
    resolved = json.loads((tmp_path / "run" / "resolved_config.json").read_text())
    assert resolved["deepspeed"]["bf16"]["enabled"] and resolved["deepspeed"]["communication_data_type"] == "fp32"
    records = metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records.values())
    assert records[10]["loss/ntp"] < records[1]["loss/ntp"]
    # Dropless capacity over the mean expert load: ≥ 1, logged per expert-parallel layer.
    assert all(records[s]["moe/layer_00/capacity_over_mean_load"] >= 1 for s in records)
    assert "moe/layer_02/expert_load/00" not in records[1]  # layer 2 stayed dense
    before = load_file(upcycled_wide / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    changed = {key for key in before if not torch.equal(before[key].to(torch.bfloat16), after[key])}
    assert changed and all(".router." in key or new_expert(key) for key in changed)
    assert {f"model.layers.0.mlp.experts.{k}.up_proj.weight" for k in range(1, 5)} <= changed


def test_activation_checkpointing_gives_the_same_training(stage1_run, corpus_dir, upcycled, tmp_path):
    """Recomputing activations (expert-parallel all-to-all included) changes memory, not the numbers."""
    config = base_config(upcycled, corpus_dir, tmp_path / "run", activation_checkpointing=True)
    run(1, config, tmp_path, "stage1_zero2.json")
    ours, reference = metrics(tmp_path / "run"), metrics(stage1_run)
    assert sorted(ours) == sorted(reference) == list(range(1, 31))
    for step in ours:
        for key in ("loss/ntp", "loss/balance", "grad_norm"):
            assert ours[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert not config.get("gradient_checkpointing")  # a training setting, not part of the exported model


def test_prepared_data_trains_exactly_like_raw_text(stage1_run, corpus_dir, upcycled, tmp_path):
    """`data: DIR` naming a `layermoe data tokenize` output (2 workers, small chunks: many shards) gives the raw-text
    run's batches: every logged number of the 30 steps is equal."""
    from layermoe_ds.cli import main

    prepared = tmp_path / "prepared"
    argv = ["data", "tokenize", "--data", str(corpus_dir), "--tokenizer", str(upcycled), "--out", str(prepared)]
    assert main([*argv, "--langs", "fr,ru,el", "--splits", "train", "--workers", "2", "--chunk-mb", "0.1"]) == 0
    run(1, base_config(upcycled, prepared, tmp_path / "run"), tmp_path, "stage1_zero2.json")
    ours, reference = metrics(tmp_path / "run"), metrics(stage1_run)
    for step in reference:
        for key in ("loss/ntp", "loss/balance", "grad_norm"):
            assert ours[step][key] == reference[step][key], (step, key)


def test_stage2_trains_only_gates_and_sends_old_tokens_home(stage1_run, corpus_dir, tmp_path):
    config = base_config(
        stage1_run / "model",
        corpus_dir,
        tmp_path / "run",
        steps=30,
        lr=0.05,
        stage2_docs_per_old_lang=300,
        stage2_docs_per_new_lang=300,
    )
    run(2, config, tmp_path, "stage2.json")
    before = load_file(stage1_run / "model" / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    for key in before:
        trained = ".router." in key or ".classifier." in key
        assert torch.equal(before[key], after[key]) != trained, key
    records = metrics(tmp_path / "run")
    layers = [k for k in records[1] if k.startswith("routing/") and k.endswith("old_to_expert0")]
    assert layers

    def share(steps):
        return sum(records[s][k] for s in steps for k in layers) / (len(steps) * len(layers))

    assert share(range(26, 31)) > share(range(1, 6)) + 0.05
    assert records[30]["classifier/accuracy"] > 0.5
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["classifier_routing"] is True

    # Activation checkpointing in stage 2: the same first two steps (the learning-rate schedule depends on `steps`,
    # so later ones differ), gradients reaching the routers through recomputed layers.
    short = {**config, "out": str(tmp_path / "ckpt"), "steps": 2, "save_every": 2, "activation_checkpointing": True}
    run(2, short, tmp_path, "stage2.json")
    for step, record in metrics(tmp_path / "ckpt").items():
        for key in ("loss/total", "loss/ntp", "loss/lpr", "loss/cls"):  # step 2's follow step 1's gradients
            assert record[key] == pytest.approx(records[step][key], rel=1e-5, abs=1e-7), (step, key)


# Kills, SIGTERM, damaged checkpoints, a full disk and world-size changes: tests/test_faults.py.


def test_a_checkpoint_from_another_allocation_is_refused_untouched(
    single_rank, tiny_base, stage1_run, corpus_dir, tmp_path, capsys
):
    """(The other bad training inputs: tests/test_bad_inputs.py.)"""
    other = tmp_path / "other"
    shutil.copytree(stage1_run, other)
    resolved = json.loads((other / "resolved_config.json").read_text())
    dense = base_config(tiny_base, corpus_dir, other, steps=30)
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    (tmp_path / "alloc.json").write_text(json.dumps({"experts_per_layer": [2, 2, 2], "classifier_layers": [0]}))
    code, err = launch_in_process(
        1, {**dense, "allocation": str(tmp_path / "alloc.json")}, tmp_path, "stage1_zero2.json", capsys
    )
    assert code == 2 and "already holds a different run" in err
    (other / "resolved_config.json").unlink()
    code, err = launch_in_process(
        1, {**dense, "allocation": str(tmp_path / "alloc.json")}, tmp_path, "stage1_zero2.json", capsys
    )
    assert code == 2 and "made for another allocation" in err, err
    (other / "resolved_config.json").write_text(json.dumps(resolved))
    after = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "resolved_config.json"} == {
        p: t for p, t in before.items() if p.name != "resolved_config.json"
    }


def test_lifelong_step_trains_only_the_new_groups_experts(stage1_run, corpus_dir, tmp_path):
    """G0 → G1 (the stage-1 run) → G2: grow, then stage 1 again with three language groups."""
    from layermoe_ds.cli import main

    (tmp_path / "alloc_g2.json").write_text(json.dumps({"experts_per_layer": [2, 1, 3], "classifier_layers": [2]}))
    grown = tmp_path / "grown"
    assert (
        main(
            [
                "grow",
                "--model",
                str(stage1_run / "model"),
                "--allocation",
                str(tmp_path / "alloc_g2.json"),
                "--out",
                str(grown),
            ]
        )
        == 0
    )
    config = base_config(
        grown, corpus_dir, tmp_path / "run", steps=8, save_every=8, language_groups=[["en", "de"], ["fr", "ru"], ["el"]]
    )
    run(1, config, tmp_path, "stage1_zero2.json")
    groups = json.loads((grown / "config.json").read_text())["expert_groups"]
    before = load_file(grown / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    changed_g2_layers = set()
    for key in before:
        if new_expert(key):
            layer, expert = int(key.split(".")[2]), new_expert(key)
            if groups[layer][expert] != 2:
                assert torch.equal(before[key], after[key]), f"earlier group's expert changed: {key}"
            elif not torch.equal(before[key], after[key]):
                changed_g2_layers.add(layer)
        elif ".router." not in key:
            assert torch.equal(before[key], after[key]), key
    assert changed_g2_layers == {0, 2}  # the layers that gained G2 experts


def test_full_finetune_baseline_trains_every_parameter_of_the_dense_model(tiny_base, corpus_dir, tmp_path):
    """The forgetting baseline: stage 1 with `full_finetune` on 2 ranks (ZeRO-2) trains and exports a dense model,
    and its checkpoint evaluates like any other."""
    from layermoe_ds.hf.sources import load_model
    from layermoe_ds.modeling.types import is_layermoe

    config = base_config(tiny_base, corpus_dir, tmp_path / "run", steps=10, save_every=10, full_finetune=True)
    run(1, config, tmp_path, "stage1_zero2.json")
    before = load_file(tiny_base / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[key], after[key]) for key in before), "a parameter did not train"
    records = metrics(tmp_path / "run")
    assert records[10]["loss/ntp"] < records[1]["loss/ntp"]
    assert not any(key.startswith("moe/") and key != "moe/dropped" for key in records[1])
    exported, _, _ = load_model(tmp_path / "run" / "model")
    from_checkpoint, _, described = load_model(tmp_path / "run")
    assert not is_layermoe(exported) and "step 10" in described
    for (name, a), (_, b) in zip(exported.state_dict().items(), from_checkpoint.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("ds_json", ["stage1_zero2.json", "stage2.json"])
def test_the_end_of_run_export_frees_the_optimizer_first(
    ds_json, single_rank, upcycled, corpus_dir, tmp_path, monkeypatch
):
    """Adam's moments and ZeRO's fp32 master copies are gone when the export starts (weak references dead), and
    the export is the trained model's."""
    import gc
    import weakref

    from layermoe_ds.config import load_config
    from layermoe_ds.ds.engine import load_ds_config
    from layermoe_ds.training import loop
    from tests.helpers import CPU, ROOT

    stage = 1 if ds_json.startswith("stage1") else 2
    (tmp_path / "run.json").write_text(json.dumps(base_config(upcycled, corpus_dir, tmp_path / "run", steps=2)))
    config = load_config(loop.TrainConfig, tmp_path / "run.json", {})
    trainer = loop.StageTrainer(stage, config, load_ds_config([ROOT / "ds_configs" / ds_json, CPU]))
    assert not trainer.train()
    optimizer = trainer.engine.optimizer
    held = [t for state in getattr(optimizer, "optimizer", optimizer).state.values() for t in state.values()]
    held += list(getattr(optimizer, "single_partition_of_fp32_groups", []))
    refs = [weakref.ref(t) for t in held if torch.is_tensor(t) and t.numel() > 1]
    del optimizer, held
    alive_at_export = []
    export = loop.export_model

    def watched(*args, **kwargs):
        gc.collect()
        alive_at_export.append(sum(ref() is not None for ref in refs))
        return export(*args, **kwargs)

    monkeypatch.setattr(loop, "export_model", watched)
    trainer.export()
    assert refs and alive_at_export == [0]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
