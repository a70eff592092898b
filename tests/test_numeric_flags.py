"""Every numeric flag of every verb, and every numeric key of the run configs, is validated with its name: counts
and lengths ≥ 1 (≥ 0 where 0 means something stated), rates and timeouts > 0. Property-based: hypothesis draws the
bad values."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermoe_ds.cli import build_parser, main
from layermoe_ds.config import TrainConfig
from layermoe_ds.errors import InputError
from layermoe_ds.flags import _fields, count, positive, share, unset_or
from layermoe_ds.settings import SETTINGS, BenchmarkSettings, EvalSettings, ProfileSettings
from layermoe_testbed.pretrain_config import BaseModelConfig, PretrainConfig


def numeric_actions():
    """(verb path, flag, its type) of every option that takes a number, over every verb and sub-verb."""
    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and (
                action.type in (int, float) or action.type is positive or hasattr(action.type, "minimum")
            ):
                found.append((tuple(path), action.option_strings[-1], action.type))

    walk(build_parser(), [])
    return found


EVERY_NUMERIC = numeric_actions()
RANGED = [case for case in EVERY_NUMERIC if case[2] not in (int, float)]
# Flags derived from a config dataclass (`pretrain`'s, `profile`'s, `evaluate`'s and `benchmark`'s; the launchers'
# TrainConfig flags likewise) set that field, and the config checks it, naming the key
# (test_a_config_key_out_of_range_is_refused_naming_the_key).
DERIVED_BY_VERB = {"pretrain": PretrainConfig, **SETTINGS}
DERIVED = {verb: {flag for _, flag, _, _ in _fields(cls)} for verb, cls in DERIVED_BY_VERB.items()}


def test_every_numeric_flag_is_validated():
    assert len(RANGED) >= 15 and len(EVERY_NUMERIC) >= 40  # the walk sees every verb's flags
    plain = [
        (" ".join(path), flag)
        for path, flag, kind in EVERY_NUMERIC
        if kind in (int, float) and not (len(path) == 1 and flag.removeprefix("--") in DERIVED.get(path[0], ()))
    ]
    assert not plain, f"numeric flags without a range: {plain}"


@pytest.mark.parametrize("path, flag, kind", RANGED, ids=[f"{' '.join(p)} {f}" for p, f, _ in RANGED])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_value_out_of_range_is_refused_naming_the_flag(path, flag, kind, data, capsys):
    if kind is positive:
        value = data.draw(st.floats(max_value=0, allow_nan=False))
    else:
        value = data.draw(st.integers(max_value=kind.minimum - 1, min_value=-(10**6)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*path, f"{flag}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "must be" in err, err


def test_the_flag_types_accept_their_range():
    assert count()("1") == 1 and count(0)("0") == 0 and positive("0.5") == 0.5 and share(0.5)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 0 and < 0.5"):
        share(0.5)("0.5")
    with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number"):
        count()("2.5")


def test_a_derived_flag_out_of_range_is_refused_through_its_config(tmp_path, capsys):
    argv = ["pretrain", "--data", str(tmp_path), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*argv, "--steps", "0"]) == 2
    assert "pretrain.steps: 0 must be >= 1" in capsys.readouterr().err
    evaluate = ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--langs", "en"]
    assert main([*evaluate, "--batch-size", "0"]) == 2
    assert "evaluate.batch_size: 0 must be >= 1" in capsys.readouterr().err
    profile = ["profile", "--model", str(tmp_path), "--data", str(tmp_path), "--old", "en", "--new", "fr"]
    assert main([*profile, "--out", str(tmp_path / "s.json"), "--seq-len", "-3"]) == 2
    assert "profile.seq_len: -3 must be >= 1" in capsys.readouterr().err


# Each numeric config key's valid range: (lowest allowed or "open" for > 0, highest allowed or None).
RULES = {
    "steps": (1, None), "seq_len": (1, None), "save_every": (1, None), "keep_last_n": (1, None), "log_every": (1, None),
    "stage2_docs_per_old_lang": (1, None), "stage2_docs_per_new_lang": (1, None), "batch_size": (1, None),
    "warmup_steps": (0, None), "seed": (0, None), "weight_decay": (0, None), "balance_alpha": (0, None),
    "lpr_gamma": (0, None), "cls_eta": (0, None), "router_anchor_beta": (0, None), "lr": ("open", None),
    "capacity_factor": ("open", None),
    "dist_timeout_minutes": ("open", None), "min_lr_ratio": (0, 1), "low_resource_share": (0, 0.5),
    "num_layers": (1, None), "hidden_size": (1, None), "num_heads": (1, None), "num_kv_heads": (1, None),
    "intermediate_size": (1, None), "max_position": (1, None), "tokens_per_lang": (1, None), "max_tokens": (1, None),
    "limit": (1, None), "flores_shots": (1, None), "beams": (1, None), "flores_max_new_tokens": (1, None),
}  # fmt: skip
TRAIN = {"model": "m", "data": "d", "out": "o", "language_groups": (("en",), ("fr",))}
WHERE = {TrainConfig: "train", PretrainConfig: "pretrain", BaseModelConfig: "model"}
WHERE |= {cls: verb for verb, cls in SETTINGS.items()}
# What each class needs besides the value under test to be built at all.
REQUIRED = {
    TrainConfig: TRAIN,
    ProfileSettings: {"model": "m", "data": "d", "old": ("en",), "new": ("fr",), "out": "o"},
    EvalSettings: {"model": "m", "data": "d", "langs": ("en",)},
    BenchmarkSettings: {"model": "m", "old": ("en",), "new": ("fr",), "out": "o"},
}


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if unset_or(hints[f.name]) in (int, float)]


def bad_values(low, high):
    below = st.integers(max_value=0 if low == "open" else low - 1, min_value=-(10**6))
    if high is None:
        return below
    return st.one_of(below, st.floats(min_value=high + 1e-6, max_value=1e6, allow_nan=False))


@pytest.mark.parametrize("cls, name", [(cls, name) for cls in WHERE for name in numeric_fields(cls)])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_a_config_key_out_of_range_is_refused_naming_the_key(cls, name, data):
    assert name in RULES, f"{cls.__name__}.{name} has no stated range"
    value = data.draw(bad_values(*RULES[name]))
    with pytest.raises(InputError, match=rf"{WHERE[cls]}\.{name}"):
        cls(**{**REQUIRED.get(cls, {}), name: value})


@pytest.mark.parametrize("verb", ["evaluate", "profile"])
def test_a_length_beyond_the_models_context_is_refused_naming_both(verb, tiny_base, corpus_dir, capsys):
    """The tiny base has 64 positions: reading it at 100,000 tokens gave a meaningless score before."""
    langs = ["--langs", "en"] if verb == "evaluate" else ["--old", "en", "--new", "fr", "--out", "/nonexistent/x.json"]
    argv = [verb, "--model", str(tiny_base), "--data", str(corpus_dir), *langs, "--seq-len", "100000"]
    assert main(argv) == 2
    assert "--seq-len: 100000 tokens is longer than the model's context (64 positions)" in capsys.readouterr().err
