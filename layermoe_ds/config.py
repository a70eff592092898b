"""Typed, validated configuration: dataclasses loaded from YAML/JSON with CLI overrides.

Each dataclass validates itself in `__post_init__` and names the offending field and value. Unknown keys are
errors with a 'did you mean' suggestion, never silently ignored. A field's `metadata` holds its help text (and,
where the flag is not the field's name, its flag): `layermoe_ds.flags` derives the command-line flags from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from layermoe_ds.errors import InputError, MissingInputError

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

if sys.version_info >= (3, 11):
    StrEnum = enum.StrEnum
else:  # Python 3.10: the same behaviour for what is used here (members are their strings)

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class Resume(StrEnum):
    AUTO = "auto"  # the newest complete checkpoint in out/checkpoints, if any
    NO = "no"  # refuse a directory that has checkpoints


def setting(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, **field_kw) -> Any:
    """A config field with its help text, and its flag name when that is not the field's (`--layers` for
    `model.num_layers`)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag}, **field_kw)


def choice(kind: type[E], value: Any, what: str) -> E:
    """`value` as a member of the StrEnum `kind`; anything else is an error naming `what` and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{what}: {value!r} is not one of {', '.join(m.value for m in kind)}") from None


def coerce_choices(config: Any, where: str) -> None:
    """Turn each StrEnum field's string into its member (frozen dataclass), naming the field and the choices."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            object.__setattr__(config, name, choice(hint, getattr(config, name), f"{where}.{name}"))


def at_least(config: Any, where: str, minimum: int, *names: str) -> None:
    """Each named field is a whole number ≥ `minimum` (a field left unset, None, passes)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:
            raise InputError(f"{where}.{name}: {value} must be >= {minimum}")


def check_schedule(config: Any, where: str) -> None:
    """A positive peak learning rate, and fewer warm-up steps than steps."""
    if not config.lr > 0:
        raise InputError(f"{where}.lr: {config.lr} must be > 0")
    if not 0 <= config.warmup_steps < config.steps:
        raise InputError(f"{where}.warmup_steps: {config.warmup_steps} must be in [0, steps={config.steps})")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Stage 1 / stage 2 training (`launchers/stage1.py`, `launchers/stage2.py`): the LayerMoE settings.

    DeepSpeed's JSON owns engine settings (ZeRO stage, precision, micro-batch size, gradient accumulation,
    gradient clipping); this owns what LayerMoE defines. No value has two sources. The defaults are a real run's
    (the reference: sequences of 1,024 tokens, lr 5e-5, cosine decay); the testbed presets set their small values.
    """

    model: str = setting("", "dense HF model directory (stage 1 with --allocation) or a LayerMoE directory")
    allocation: str = setting("", "stage 1 from a dense model: upcycle with this allocation.json first")
    data: str = setting("", "raw data directory or jsonl, or a `layermoe data tokenize` directory")
    out: str = setting("", "the run directory")
    # Language groups in expansion order: [[old…], [new…]] (lifelong: [[G0…], [G1…], [G2…]]). The last group is
    # what this run teaches; tokens are labelled with their group index.
    language_groups: tuple[tuple[str, ...], ...] = setting(
        (), "groups in expansion order, e.g. 'en,de;fr,ru,el' (old;new); the last one is taught"
    )
    steps: int = setting(2000, "optimizer steps")
    seq_len: int = setting(1024, "tokens per packed sequence")
    lr: float = setting(5e-5, "peak learning rate")
    warmup_steps: int = setting(0, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = setting(0.1, "the cosine's floor as a fraction of lr")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "initialisation of new weights and data order")
    # Losses (LayerMoE/MoE-LPR): stage 1 NTP + alpha·balance; stage 2 NTP + gamma·LPR + eta·classification.
    balance_alpha: float = setting(0.01, "stage 1: weight of the load-balancing loss")
    lpr_gamma: float = setting(0.1, "stage 2: weight of the LPR loss (old-language tokens to expert 0)")
    cls_eta: float = setting(0.1, "stage 2: weight of the language-classifier loss")
    # Not the paper's: KL from each router as stage 1 left it, on the newest group's tokens (training/router_anchor.py).
    router_anchor_beta: float = setting(0.0, "stage 2: weight of keeping the new languages' stage-1 routing; 0 = off")
    # Stage 2's review set: the first N documents of each language of an earlier group (replayed) and of each
    # language of the group this run teaches. The reference's mix: 50K per old language, 100K per new one.
    stage2_docs_per_old_lang: int = setting(50_000, "stage 2: documents replayed per earlier-group language")
    stage2_docs_per_new_lang: int = setting(100_000, "stage 2: documents per language of the taught group")
    # Expert parallelism and capacity. Dropless by default, as the reference trains: each expert's capacity is the
    # largest load in its expert-parallel group (one all-reduce of a scalar per layer and step). `drop_tokens: true`
    # caps it at capacity_factor · k·S/E instead (fixed buffer sizes; overflowing routes are dropped and logged as
    # moe/dropped). Evaluation never drops a token either way.
    expert_parallel_size: str = setting("auto", "ranks an expert group is split over: auto or an integer")
    drop_tokens: bool = setting(False, "cap each expert at capacity_factor·k·S/E and drop the overflow")
    capacity_factor: float = setting(1.25, "with --drop-tokens: the cap's factor")
    # The forgetting baseline: stage 1 trains every parameter of the dense model (no upcycling, nothing frozen).
    full_finetune: bool = setting(False, "the forgetting baseline: train every parameter of the dense --model")
    # Recompute each decoder layer's activations in the backward pass instead of storing them (less memory, about
    # one more forward of compute); both stages, and the dense baseline.
    activation_checkpointing: bool = setting(False, "recompute decoder-layer activations in the backward pass")
    # Process-group timeout (minutes): how long a rank waits in a collective for the others before the job fails.
    dist_timeout_minutes: float = setting(30.0, "how long a rank waits in a collective for the others")
    # Checkpoints and logging.
    save_every: int = setting(500, "checkpoint every N steps")
    keep_last_n: int = setting(2, "complete checkpoints kept")
    log_every: int = setting(10, "a log line every N steps")
    # A diagnostic: the operations that read device values on the host (GPU→CPU syncs) in this process's first
    # step, by section and operation, into OUT/host_reads.json (training/host_reads.py).
    count_host_reads: bool = setting(False, "count the first step's host reads into OUT/host_reads.json")
    resume: Resume = setting(Resume.AUTO, "auto: from the newest complete checkpoint; no: refuse existing ones")

    def __post_init__(self) -> None:
        coerce_choices(self, "train")
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise InputError(f"train.{name}: required (give it in the YAML or as --{name})")
        groups = self.language_groups
        if len(groups) < 2 or not all(isinstance(g, list | tuple) and g for g in groups):
            raise InputError(
                f"train.language_groups: {list(groups)!r} needs at least two non-empty groups, "
                "e.g. [[en, de], [fr, ru, el]]"
            )
        langs = [lang for group in groups for lang in group]
        if len(set(langs)) != len(langs):
            raise InputError(f"train.language_groups: a language appears twice in {list(groups)!r}")
        at_least(self, "train", 1, "steps", "seq_len", "save_every", "keep_last_n", "log_every")
        at_least(self, "train", 1, "stage2_docs_per_old_lang", "stage2_docs_per_new_lang")
        check_schedule(self, "train")
        if self.expert_parallel_size != "auto" and not str(self.expert_parallel_size).isdigit():
            raise InputError(f"train.expert_parallel_size: {self.expert_parallel_size!r} must be 'auto' or an integer")
        if not self.dist_timeout_minutes > 0:
            raise InputError(f"train.dist_timeout_minutes: {self.dist_timeout_minutes} must be > 0")
        for name in ("weight_decay", "balance_alpha", "lpr_gamma", "cls_eta", "router_anchor_beta", "seed"):
            if not getattr(self, name) >= 0:
                raise InputError(f"train.{name}: {getattr(self, name)} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"train.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.capacity_factor <= 0:
            raise InputError(f"train.capacity_factor: {self.capacity_factor} must be > 0")
        if self.full_finetune and self.allocation:
            raise InputError(
                f"train.full_finetune: trains the dense model itself; remove train.allocation ({self.allocation})"
            )

    @property
    def new_langs(self) -> list[str]:
        return list(self.language_groups[-1])

    @property
    def old_langs(self) -> list[str]:
        return [lang for group in self.language_groups[:-1] for lang in group]

    def group_of(self, lang: str) -> int:
        return next(i for i, group in enumerate(self.language_groups) if lang in group)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(choices)})"


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys raise ValueError naming the key with a suggestion."""
    if not isinstance(data, dict):
        raise InputError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise InputError(f"config: unknown key {path!r}{_suggest(key, list(hints))}")
        if dataclasses.is_dataclass(hints[key]):
            value = from_dict(hints[key], value, path)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list | tuple) else v for v in value)
        kwargs[key] = value
    return cls(**kwargs)


def load_config(
    cls: type[T], path: Path | None, overrides: dict[str, Any] | None = None, defaults: T | None = None
) -> T:
    """Defaults (the class's, or `defaults`, e.g. a preset) ← YAML/JSON file ← `overrides` (dotted keys, e.g.
    `{"model.num_layers": 2}`), validated."""
    data: dict[str, Any] = to_dict(defaults) if defaults is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"config: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            from_file = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise InputError(f"config: {path} cannot be parsed: {exc}") from exc
        data = deep_merge(data, from_file)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, data)


def parse_groups(text: str, what: str = "--language-groups") -> list[list[str]]:
    """Language groups in expansion order from "en,de;fr,ru,el" (old; new; …); an empty group or language is an
    error naming `what`."""
    groups = [[lang.strip() for lang in group.split(",")] for group in text.split(";")]
    if any(not lang for group in groups for lang in group):
        raise InputError(f"{what}: {text!r} has an empty group or language; write e.g. 'en,de;fr,ru,el'")
    return groups


def deep_merge(base: dict, update: Any) -> Any:
    """`update` over `base`, nested mappings merged key by key (anything else in `update` replaces); a new value,
    neither argument changed."""
    if not isinstance(update, dict):
        return update
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(base[key], value) if isinstance(base.get(key), dict) else value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
