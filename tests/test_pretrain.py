import json

import pytest
import torch

from layermoe_ds.config import load_config
from layermoe_testbed import pretrain as pretrain_mod
from layermoe_testbed.pretrain_config import BaseModelConfig, PretrainConfig


def test_base_model_is_a_loadable_hf_model_and_old_beats_new(tiny_base, corpus_dir):
    from layermoe_ds.data.streams import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.eval.perplexity import evaluate_languages
    from layermoe_ds.hf.load import load_causal_lm

    info = json.loads((tiny_base / pretrain_mod.DONE_FILE).read_text())
    assert info["losses_every_10"][0] > info["final_loss"] + 1.0
    model = load_causal_lm(tiny_base)
    tokenizer = load_tokenizer(tiny_base)
    streams = open_streams(corpus_dir, tokenizer, tiny_base, ["en", "ru"], "valid")
    results = evaluate_languages(model, tokenizer, streams, 32, max_tokens=2000)
    assert results["en"]["bpb"] < results["ru"]["bpb"]


def test_kill_and_rerun_gives_the_uninterrupted_result(corpus_dir, tokenizer_dir, tiny_config, tmp_path, monkeypatch):
    config = PretrainConfig(
        model=tiny_config.model,
        langs=tiny_config.langs,
        steps=10,
        batch_size=4,
        seq_len=32,
        warmup_steps=2,
        save_every=4,
    )
    full = pretrain_mod.pretrain(config, corpus_dir, tokenizer_dir, tmp_path / "full")

    real_save = pretrain_mod._save_state

    def save_then_die(path, model, optimizer, sampler, step, *rest):
        real_save(path, model, optimizer, sampler, step, *rest)
        if step == 8:
            raise KeyboardInterrupt("simulated kill after the step-8 save")

    monkeypatch.setattr(pretrain_mod, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mod.pretrain(config, corpus_dir, tokenizer_dir, tmp_path / "killed")
    assert (tmp_path / "killed" / pretrain_mod.STATE_FILE).is_file()
    monkeypatch.setattr(pretrain_mod, "_save_state", real_save)
    resumed = pretrain_mod.pretrain(config, corpus_dir, tokenizer_dir, tmp_path / "killed")
    assert resumed["final_loss"] == full["final_loss"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "killed" / pretrain_mod.STATE_FILE).exists()


def test_other_settings_do_not_overwrite_a_finished_model(tiny_base, corpus_dir, tokenizer_dir, tiny_config):
    other = PretrainConfig(
        model=tiny_config.model,
        langs=tiny_config.langs,
        steps=41,
        batch_size=8,
        seq_len=32,
        warmup_steps=4,
        save_every=20,
    )
    with pytest.raises(FileExistsError, match="other settings"):
        pretrain_mod.pretrain(other, corpus_dir, tokenizer_dir, tiny_base)


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="model.hidden_size: 30 is not divisible by num_heads 4"):
        BaseModelConfig(hidden_size=30)
    with pytest.raises(ValueError, match="pretrain.seq_len: 1024 exceeds model.max_position 512"):
        PretrainConfig(seq_len=1024)
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ValueError, match=r"unknown key 'model.num_layer' \(did you mean 'num_layers'\?\)"):
        load_config(PretrainConfig, path)
    path.write_text("steps: 50\nmodel:\n  arch: qwen2\n")
    config = load_config(PretrainConfig, path, {"model.num_layers": 2, "lr": None})
    assert (config.steps, config.model.arch, config.model.num_layers, config.lr) == (50, "qwen2", 2, 3e-3)


def test_qwen2_architecture_builds(tokenizer_dir):
    from layermoe_ds.data.tokenizer import load_tokenizer

    config = PretrainConfig(
        model=BaseModelConfig(
            arch="qwen2", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64
        )
    )
    model = pretrain_mod.build_base_model(config, load_tokenizer(tokenizer_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 2


def test_presets_flags_and_files_layer_in_order(tmp_path):
    """`pretrain --preset deep` starts from the deep base's settings; --config and flags override them, flags last
    (the low-resource flags included)."""
    from layermoe_ds.cli import build_parser
    from layermoe_ds.cli.models import pretrain_config as pretrain_config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("steps: 50\nmodel:\n  hidden_size: 64\n")
    argv = ["pretrain", "--preset", "deep", "--config", str(path), "--data", "d", "--tokenizer", "t", "--out", "o"]
    config = pretrain_config_from_args(build_parser().parse_args([*argv, "--low-resource-share", "0.1"]))
    assert (config.model.num_layers, config.model.hidden_size, config.steps) == (12, 64, 50)
    assert config.low_resource_langs == pretrain_mod.LATER_LANGS and config.low_resource_share == 0.1
    no_preset = pretrain_config_from_args(build_parser().parse_args(["pretrain", *argv[3:]]))
    assert no_preset == PretrainConfig(steps=50, model=BaseModelConfig(hidden_size=64))


def test_warmup_cosine_schedule():
    from layermoe_ds.training.schedule import warmup_cosine

    assert [warmup_cosine(s, 10, 2, 0.1) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert warmup_cosine(10, 10, 2, 0.1) == pytest.approx(0.1) and warmup_cosine(50, 10, 2, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(6, 10, 2, 0.0) == pytest.approx(0.5)
