"""Command-line flags derived from the config dataclasses: one flag per field (nested dataclasses flattened), its
type, choices and help from the field, so that every setting a YAML file can hold can also be given on the command
line, and a new field gets its flag without another hand-written map.

    add_config_flags(parser, TrainConfig)           # --steps, --lr, --balance-alpha, --drop-tokens/--no-drop-tokens …
    overrides = config_overrides(args, TrainConfig) # {"steps": 20, "model.num_layers": 2, …}: the flags given
    config = load_config(TrainConfig, args.config, overrides)

Flag values: a number for `int`/`float` (or `int | None`, a setting that may stay unset), `a,b` for a tuple of
strings, `a,b;c,d` for a tuple of such tuples (language groups), `--x/--no-x` for a boolean, one of the members for a
StrEnum. A flag left out is None and overrides nothing (the preset's, the file's or the field's default stands).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from layermoe_ds.config import parse_groups


def comma_list(text: str) -> tuple[str, ...]:
    """`en,de` → ("en", "de"); an empty list is an error."""
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing (expected e.g. en,de)")
    return items


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number ≥ `minimum` (1 for counts and lengths; 0 where 0 means something stated).
    argparse names the flag in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.minimum = minimum
    return parse


def positive(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def share(maximum: float) -> Callable[[str], float]:
    """An argparse type: a fraction in [0, `maximum`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 <= value < maximum:
            raise argparse.ArgumentTypeError(f"{value} must be >= 0 and < {maximum}")
        return value

    parse.minimum = 0  # (what the flag tests draw below)
    return parse


def _groups(text: str) -> tuple[tuple[str, ...], ...]:
    try:
        return tuple(tuple(group) for group in parse_groups(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, str, Any, dataclasses.Field]]:
    """(dotted field path, flag name, type, field) of every leaf field of `cls`, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, path = hints[field.name], prefix + field.name
        if dataclasses.is_dataclass(hint):
            yield from _fields(hint, path + ".")
        else:
            yield path, field.metadata.get("flag") or field.name.replace("_", "-"), hint, field


def unset_or(hint: Any) -> Any:
    """X for `X | None` (a field that may be left unset); any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return hint


def _parser_for(hint: Any) -> Callable[[str], Any] | None:
    hint = unset_or(hint)
    if hint in (int, float, str):
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args == (str, ...):
            return comma_list
        if len(args) == 2 and typing.get_origin(args[0]) is tuple and args[1] is Ellipsis:
            return _groups
    return None


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (dotted paths in `skip` left out); every default is None (= not given)."""
    group = parser.add_argument_group(f"settings ({cls.__name__} fields; they override --config)")
    for path, flag, hint, field in _fields(cls):
        if path in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        shown = default.value if isinstance(default, enum.Enum) else default
        if isinstance(shown, tuple) and all(isinstance(item, str) for item in shown):
            shown = ",".join(shown)
        help_text = field.metadata.get("help", "") + (f" (default: {shown})" if shown not in (None, "", ()) else "")
        if hint is bool:
            group.add_argument(
                f"--{flag}", dest=path, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kind = _parser_for(hint)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{field.name}: no command-line form for type {hint!r}")
        choices = [member.value for member in hint] if isinstance(hint, type) and issubclass(hint, enum.Enum) else None
        group.add_argument(
            f"--{flag}",
            dest=path,
            type=str if choices else kind,
            choices=choices,
            default=None,
            metavar=None if choices else flag.upper().replace("-", "_"),
            help=help_text,
        )


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given as flags, by dotted path (what `load_config` takes as overrides)."""
    return {path: getattr(args, path) for path, _, _, _ in _fields(cls) if getattr(args, path, None) is not None}
