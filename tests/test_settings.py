"""`profile`, `evaluate` and `benchmark` take settings dataclasses on TrainConfig's machinery: one flag per field, a
`--config` file under the flags, every key checked by name, the reference generated from them."""

import pytest

from layermoe_ds.cli import build_parser
from layermoe_ds.cli.common import settings_of
from layermoe_ds.errors import InputError
from layermoe_ds.settings import SETTINGS, DType, EvalSettings, ProfileSettings, Split


def test_a_config_file_under_the_flags(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("model: runs/x\ndata: data/tok\nlangs: [en, fr]\nbatch_size: 2\ngroups: [[en], [fr]]\n")
    args = build_parser().parse_args(["evaluate", "--config", str(config), "--batch-size", "4", "--dtype", "bfloat16"])
    settings = settings_of(args, EvalSettings)
    assert settings.model == "runs/x" and settings.langs == ("en", "fr") and settings.groups == (("en",), ("fr",))
    assert settings.batch_size == 4 and settings.dtype is DType.BFLOAT16 and settings.split is Split.TEST
    assert settings.seq_len is None and settings.max_tokens is None  # unset: the defaults the help states


def test_unknown_keys_bad_choices_and_missing_fields_are_named(tmp_path):
    config = tmp_path / "profile.yaml"
    config.write_text("model: m\ndata: d\nold: [en]\nnew: [fr]\nout: s.json\ntokens_per_language: 5\n")
    args = build_parser().parse_args(["profile", "--config", str(config)])
    with pytest.raises(InputError, match=r"unknown key 'tokens_per_language' \(did you mean 'tokens_per_lang'\?\)"):
        settings_of(args, ProfileSettings)
    with pytest.raises(InputError, match=r"profile.dtype: 'fp8' is not one of float32, bfloat16, float16"):
        ProfileSettings("m", "d", ("en",), ("fr",), "s.json", dtype="fp8")
    with pytest.raises(InputError, match=r"evaluate.split: train is what the model learned from"):
        EvalSettings("m", "d", ("en",), split="train")
    with pytest.raises(InputError, match=r"evaluate.langs: required \(give it as --langs or in --config\)"):
        EvalSettings("m", "d")


def test_every_settings_field_is_a_flag_and_in_the_reference():
    from layermoe_ds.config_reference import reference
    from layermoe_ds.flags import _fields

    page = reference()
    parser = build_parser()
    for verb, cls in SETTINGS.items():
        assert f"## `layermoe {verb}` ({cls.__name__}" in page
        help_text = parser._subparsers._group_actions[0].choices[verb].format_help()
        for path, flag, _, _ in _fields(cls):
            assert f"--{flag}" in help_text and f"| `{path}` |" in page, (verb, flag)
