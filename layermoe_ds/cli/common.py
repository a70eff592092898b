"""What several verbs share: the language-list argument type, the download cache, refusing to overwrite."""

from __future__ import annotations

from pathlib import Path

from layermoe_ds.errors import OutputExistsError
from layermoe_ds.flags import comma_list

DEFAULT_CACHE = Path.home() / ".cache" / "layermoe_ds" / "debs"


def lang_list(text: str) -> list[str]:
    """`en,de` → ["en", "de"] (argparse type)."""
    return list(comma_list(text))


def refuse_overwrite(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} already exists and is not empty; choose another --out or delete it")
