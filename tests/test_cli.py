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
