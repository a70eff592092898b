"""The configuration reference (docs/config.md), generated from the config dataclasses themselves: every key of a
run config, and of the profile, evaluate and benchmark settings, with its type, default, flag and meaning.
`python -m layermoe_ds.config_reference > docs/config.md`; a test checks the page is current."""

from __future__ import annotations

import dataclasses
import enum
import sys

from layermoe_ds.config import TrainConfig
from layermoe_ds.flags import _fields, unset_or
from layermoe_ds.settings import SETTINGS

HEADER = """# Configuration reference

Generated from `TrainConfig` (`layermoe_ds/config.py`) and the verbs' settings (`layermoe_ds/settings.py`) by
`python -m layermoe_ds.config_reference`; do not edit.
A run config (YAML or JSON) for `layermoe_ds.launchers.stage1` / `stage2` sets these keys; every key is also a
flag of the launchers, which wins over the file. DeepSpeed's JSON owns the engine's settings (micro-batch size,
gradient accumulation, clipping, precision, ZeRO stage): no value has two sources ([training](training.md)).

| key | type | default | flag | meaning |
| --- | --- | --- | --- | --- |
"""


def _type_name(hint) -> str:
    if unset_or(hint) is not hint:
        return _type_name(unset_or(hint)) + " (may be unset)"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " \\| ".join(member.value for member in hint)
    name = getattr(hint, "__name__", None) or str(hint)
    return name.replace("typing.", "").replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if value in ("", (), None):
        return "—"
    return f"`{value}`"


VERB_SECTION = """
## `layermoe {verb}` ({name}, `layermoe_ds/settings.py`)

Every key is a flag of `layermoe {verb}` and a key of the YAML/JSON its `--config` reads; flags win over the file.

| key | type | default | flag | meaning |
| --- | --- | --- | --- | --- |
"""


def _rows(cls: type) -> str:
    rows = []
    for path, flag, hint, field in _fields(cls):
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{path}` | {_type_name(hint)} | {_default(field)} | `--{flag}` | {meaning} |")
    return "\n".join(rows) + "\n"


def reference() -> str:
    page = HEADER + _rows(TrainConfig)
    for verb, cls in SETTINGS.items():
        page += VERB_SECTION.format(verb=verb, name=cls.__name__) + _rows(cls)
    return page


if __name__ == "__main__":
    sys.stdout.write(reference())
