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
    from layermoe_ds.config import load_config
    from layermoe_testbed.pretrain_config import PretrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: mistral\n")
    with pytest.raises(ValueError, match="model.arch: 'mistral' is not one of llama, qwen2"):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize(
    "failure, hint",
    [
        (RuntimeError("shape mismatch inside the model"), None),
        (__import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "micro_batch"),
        (RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7)"), "timeout"),
    ],
    ids=["internal", "cuda-oom", "nccl-timeout"],
)
def test_real_failures_keep_their_traceback_and_known_ones_get_a_hint(failure, hint, monkeypatch, tmp_path, capsys):
    """Only bad input is a one-line error (exit 2); a RuntimeError from inside — a CUDA out-of-memory, an NCCL
    timeout, a bug — propagates with its traceback, the first two with one line naming the remedy."""
    import layermoe_ds.eval.evaluate as evaluate

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(evaluate, "run_evaluation", fail)
    argv = ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--langs", "en"]
    with pytest.raises(type(failure)):
        main(argv)
    err = capsys.readouterr().err
    if hint is None:
        assert err == ""
    elif hint == "micro_batch":
        assert "train_micro_batch_size_per_gpu" in err and "activation_checkpointing" in err and "ZeRO" in err
    else:
        assert "dist_timeout_minutes" in err
    # the project's input errors stay one line, exit 2; a library's own FileNotFoundError is no input error
    from layermoe_ds.errors import MissingInputError

    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: (_ for _ in ()).throw(MissingInputError("data: x")))
    assert main(argv) == 2 and capsys.readouterr().err == "layermoe evaluate: error: data: x\n"
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("x")))
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_launcher_errors_are_input_errors_only(monkeypatch, tmp_path, capsys):
    from layermoe_ds.errors import InputError
    from layermoe_ds.training import launch

    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d\nout: o\nlanguage_groups: [[en], [fr]]\n")
    argv = ["--config", str(config), "--deepspeed_config", str(tmp_path / "ds.json")]
    monkeypatch.setattr(launch, "load_ds_config", lambda paths: {})
    monkeypatch.setattr(launch, "run_stage", lambda *a: (_ for _ in ()).throw(InputError("train.data: d is missing")))
    assert launch.main(1, argv) == 2
    assert "stage1: error: train.data: d is missing" in capsys.readouterr().err
    oom = __import__("torch").OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(launch, "run_stage", lambda *a: (_ for _ in ()).throw(oom))
    with pytest.raises(type(oom)):
        launch.main(1, argv)
    assert "train_micro_batch_size_per_gpu" in capsys.readouterr().err


def test_deepspeed_outside_the_supported_range_is_refused_in_one_line():
    from layermoe_ds.ds.internals import check_version
    from layermoe_ds.errors import InputError

    assert check_version() == "0.19.8"  # the tested release (constraints.txt)
    assert check_version("0.19.9") == "0.19.9"
    with pytest.raises(
        InputError, match=r"DeepSpeed 0\.18\.4 is installed; layermoe_ds supports deepspeed<0\.20,>=0\.19\.8"
    ):
        check_version("0.18.4")


def test_deepspeeds_muon_kernels_compile_on_first_use_not_when_imported(monkeypatch):
    """DeepSpeed's ZeRO reduction imports its Muon module on every rank; with `lazy_kernel_compile` (engine start-up)
    that import no longer loads torch._dynamo, and a kernel is compiled once, on its first call."""
    import os
    import subprocess
    import sys

    import torch
    from deepspeed.runtime import compiler

    from layermoe_ds.ds.internals import lazy_kernel_compile

    code = (
        "import sys; from layermoe_ds.ds.internals import lazy_kernel_compile; lazy_kernel_compile(); "
        "from deepspeed.runtime.zero.muon import original_muon as m; "
        "print('torch._dynamo' in sys.modules, m.muon_update.__name__)"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["False", "muon_update"], result.stderr[-2000:]

    lazy_kernel_compile()
    lazy_kernel_compile()  # idempotent
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    double = compiler.compile()(lambda x: 2 * x)
    assert compiled == []
    assert double(3) == 6 and double(4) == 8 and len(compiled) == 1


def test_the_constraints_pin_what_setup_cfg_allows():
    """constraints.txt (the tested set CI and the image install) lies inside setup.cfg's ranges."""
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    for line in setup["options"]["install_requires"].strip().splitlines():
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement.specifier))
