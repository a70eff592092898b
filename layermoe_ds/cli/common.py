"""What several verbs share: the language-list argument type, the settings flags, the download cache, refusing to
overwrite."""

from __future__ import annotations

from pathlib import Path

from layermoe_ds.errors import OutputExistsError
from layermoe_ds.flags import add_config_flags, comma_list, config_overrides

DEFAULT_CACHE = Path.home() / ".cache" / "layermoe_ds" / "debs"


def lang_list(text: str) -> list[str]:
    """`en,de` → ["en", "de"] (argparse type)."""
    return list(comma_list(text))


def refuse_overwrite(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} already exists and is not empty; choose another --out or delete it")


def add_settings(parser, cls: type) -> None:
    """`--config FILE` and one flag per field of the settings dataclass `cls` (`layermoe_ds/settings.py`)."""
    parser.add_argument("--config", type=Path, default=None, help=f"YAML/JSON with {cls.__name__} fields (flags win)")
    add_config_flags(parser, cls)


def settings_of(args, cls: type):
    """The verb's settings: the field defaults ← --config ← the flags given, checked."""
    from layermoe_ds.config import load_config

    return load_config(cls, args.config, config_overrides(args, cls))
