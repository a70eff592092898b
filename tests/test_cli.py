import subprocess
import sys

import pytest

from layermoe_ds.cli import build_parser, main


def test_every_verb_has_help(capsys):
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"data", "tokenizer", "pretrain", "evaluate", "demo"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
    assert "usage: layermoe" in capsys.readouterr().out


def test_errors_are_one_line_naming_the_culprit(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--langs", "en"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"layermoe evaluate: error: model: {tmp_path} has no config.json (not a Hugging Face model directory)"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "layermoe_ds.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_evaluate_command_on_the_tiny_base(tiny_base, corpus_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_base),
                "--data",
                str(corpus_dir),
                "--langs",
                "en,ru",
                "--old",
                "en",
                "--max-tokens",
                "500",
                "--seq-len",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    import json

    result = json.loads(out.read_text())
    assert set(result["languages"]) == {"en", "ru"} and result["new_avg"]["bpb"] > result["old_avg"]["bpb"]


def test_every_train_config_field_is_a_launcher_flag():
    """The stage launchers' flags come from `TrainConfig`: every field can be given, typed as the field is, and a
    flag left out overrides nothing."""
    import dataclasses

    from layermoe_ds.config import Resume, TrainConfig, load_config
    from layermoe_ds.flags import config_overrides
    from layermoe_ds.training.launch import build_parser as launcher_parser

    parser = launcher_parser(1)
    dests = {action.dest for action in parser._actions}
    assert {field.name for field in dataclasses.fields(TrainConfig)} <= dests
    argv = ["--deepspeed_config", "x.json", "--model", "m", "--data", "d", "--out", "o"]
    argv += ["--language-groups", "en,de;fr", "--balance-alpha", "0.5", "--drop-tokens", "--resume", "no"]
    args = parser.parse_args(argv)
    overrides = config_overrides(args, TrainConfig)
    assert overrides["language_groups"] == (("en", "de"), ("fr",)) and "lpr_gamma" not in overrides
    config = load_config(TrainConfig, None, overrides)
    assert (config.balance_alpha, config.drop_tokens, config.resume, config.lpr_gamma) == (0.5, True, Resume.NO, 0.1)
    assert load_config(TrainConfig, None, {**overrides, "drop_tokens": False}).drop_tokens is False
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--resume", "maybe"])  # argparse names the choices
    assert "full_finetune" not in {action.dest for action in launcher_parser(2)._actions}


def test_a_choice_from_a_file_is_checked_and_named(tmp_path):
    from layermoe_ds.config import PretrainConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: mistral\n")
    with pytest.raises(ValueError, match="model.arch: 'mistral' is not one of llama, qwen2"):
        load_config(PretrainConfig, path)
