"""The settings of `layermoe profile`, `evaluate` and `benchmark`: dataclasses on the same field and flag machinery
as `TrainConfig` (`config.py`, `flags.py`). Each field is one flag (and one key of the YAML/JSON a verb's `--config`
reads), checked in `__post_init__` naming the key, and listed in the generated reference (docs/config.md).

A field that may be left unset is `X | None` (None: the default the help states, e.g. a window of 1,024 tokens
within the model's context); paths are strings ("" for none).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.config import StrEnum, at_least, coerce_choices, setting
from layermoe_ds.errors import InputError


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Split(StrEnum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


class Suite(StrEnum):
    PAPER = "paper"  # ARC-Challenge, HellaSwag, MMLU, Belebele per language (and FLORES with --flores)
    NONE = "none"  # only --tasks


DEVICE_HELP = "cpu, cuda or cuda:N; unset: this rank's GPU when there is one, else cpu"


def _required(settings, where: str, *names: str) -> None:
    for name in names:
        if not getattr(settings, name):
            raise InputError(f"{where}.{name}: required (give it as --{name.replace('_', '-')} or in --config)")


def _disjoint(where: str, old, new) -> None:
    both = sorted(set(old) & set(new))
    if both:
        raise InputError(f"{where}: {both} are in both --old and --new")
    for name, langs in (("old", old), ("new", new)):
        if len(set(langs)) != len(langs):
            raise InputError(f"{where}.{name}: lists a language twice: {list(langs)}")


def path_or_none(text: str) -> Path | None:
    return Path(text) if text else None


@dataclass(frozen=True)
class ProfileSettings:
    """`layermoe profile`: the layer-wise old/new-language similarity of the FFN input (Eq. 8-9)."""

    model: str = setting("", "HF model directory (dense or LayerMoE)")
    data: str = setting("", "raw data directory or jsonl, or a `layermoe data tokenize` directory")
    old: tuple[str, ...] = setting((), "languages the model knows, e.g. en,de")
    new: tuple[str, ...] = setting((), "languages to add, e.g. fr,ru,el")
    out: str = setting("", "similarity.json to write")
    tokens_per_lang: int = setting(100_000, "T: held-out tokens profiled per language (the reference's 100,000)")
    plot: str = setting("", "PNG of the per-layer and per-pair similarity")
    split: Split = setting(Split.VALID, "which split's tokens")
    seq_len: int | None = setting(None, "row length; unset: 256, or the model's context where shorter")
    batch_size: int = setting(8, "rows per forward")
    dtype: DType = setting(DType.FLOAT32, "the model's dtype while profiling")
    device: str = setting("", DEVICE_HELP)
    tokenizer: str = setting("", "tokenizer directory; unset: the model directory's")
    strict: bool = setting(False, "fail instead of warning when a language has fewer than tokens_per_lang tokens")
    seed: int = setting(0, "recorded with the result (the profile itself reads the first tokens of each language)")

    def __post_init__(self) -> None:
        coerce_choices(self, "profile")
        _required(self, "profile", "model", "data", "old", "new", "out")
        _disjoint("profile", self.old, self.new)
        at_least(self, "profile", 1, "tokens_per_lang", "seq_len", "batch_size")
        at_least(self, "profile", 0, "seed")


@dataclass(frozen=True)
class EvalSettings:
    """`layermoe evaluate`: per-language loss, perplexity, bits per byte and routing on held-out text."""

    model: str = setting("", "model directory, checkpoint (RUN/checkpoints/step_N) or run directory")
    data: str = setting("", "raw data directory or jsonl, or a `layermoe data tokenize` directory")
    langs: tuple[str, ...] = setting((), "languages to evaluate, e.g. en,fr,ru")
    old: tuple[str, ...] = setting((), "old languages (group 0, for Old-avg)")
    groups: tuple[tuple[str, ...], ...] = setting(
        (), "lifelong language groups in expansion order, e.g. 'en,de;fr,ru;el'"
    )
    split: Split = setting(Split.TEST, "valid or test")
    seq_len: int | None = setting(None, "window length; unset: 1024, or the model's context where shorter")
    batch_size: int = setting(8, "windows per forward")
    max_tokens: int | None = setting(None, "tokens per language; unset: the whole split")
    dtype: DType = setting(DType.FLOAT32, "the model's dtype while evaluating")
    device: str = setting("", DEVICE_HELP)
    dist_timeout_minutes: float = setting(30.0, "process-group timeout under a launcher")
    base: str = setting("", "for a checkpoint: its base model's new location")
    out: str = setting("", "write the results as JSON")

    def __post_init__(self) -> None:
        coerce_choices(self, "evaluate")
        _required(self, "evaluate", "model", "data", "langs")
        if self.split is Split.TRAIN:
            raise InputError("evaluate.split: train is what the model learned from; evaluate on valid or test")
        at_least(self, "evaluate", 1, "seq_len", "batch_size", "max_tokens")
        if not self.dist_timeout_minutes > 0:
            raise InputError(f"evaluate.dist_timeout_minutes: {self.dist_timeout_minutes} must be > 0")


@dataclass(frozen=True)
class BenchmarkSettings:
    """`layermoe benchmark`: the paper's lm-eval protocol per language, and FLORES translation."""

    model: str = setting("", "model directory (dense or LayerMoE)")
    old: tuple[str, ...] = setting((), "old languages, e.g. en,zh,es")
    new: tuple[str, ...] = setting((), "new languages, e.g. el,hu,tr")
    out: str = setting("", "directory for results.json and results.md")
    suite: Suite = setting(Suite.PAPER, "paper: the paper's benchmarks; none: only --tasks")
    tasks: tuple[str, ...] = setting((), "more lm-eval tasks per language: my_mc_{lang} or my_mc_{lang}:3")
    include_path: str = setting("", "a directory of your own lm-eval task YAMLs")
    datasets: str = setting("", "local dataset snapshots, DIR/<hub repository>")
    limit: int | None = setting(None, "documents per task and sentences per FLORES direction (a look, not a score)")
    batch_size: int = setting(1, "lm-eval's batch size")
    dtype: DType = setting(DType.FLOAT32, "the model's dtype")
    device: str = setting("", DEVICE_HELP)
    dry_run: bool = setting(False, "write the plan and the missing tasks; run no model")
    flores: str = setting("", "a FLORES-101/200 directory (dev/, devtest/): translation to and from English, chrF")
    flores_shots: int = setting(8, "dev examples in each translation prompt")
    beams: int = setting(6, "beam width of the translations")
    flores_max_new_tokens: int = setting(256, "longest translation generated")
    comet: str = setting("", "a local COMET checkpoint (model.ckpt): COMET beside chrF (pip install unbabel-comet)")

    def __post_init__(self) -> None:
        coerce_choices(self, "benchmark")
        _required(self, "benchmark", "model", "old", "new", "out")
        _disjoint("benchmark", self.old, self.new)
        at_least(self, "benchmark", 1, "limit", "batch_size", "flores_shots", "beams", "flores_max_new_tokens")
        if self.comet and not self.flores:
            raise InputError("benchmark --comet: scores translations; give --flores DIR as well")


SETTINGS = {"profile": ProfileSettings, "evaluate": EvalSettings, "benchmark": BenchmarkSettings}
