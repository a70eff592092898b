"""What a checkpoint is on disk, read and written by the same rules: a run's `checkpoints/step_NNNNNNNN/`
directories, complete once `COMPLETE.json` (the marker rank 0 writes last) exists; the marker's manifest of every
file's size and SHA-256; the pointer to the frozen base a slim checkpoint leaves out; the expert layout it belongs
to; and the slot → expert id table of its DeepSpeed expert files (`ds/placement.py`, `ds/names.py`)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from layermoe_ds.ds.placement import expert_placement
from layermoe_ds.errors import InputError
from layermoe_ds.io import sha256_file
from layermoe_ds.modeling.types import moe_blocks

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


TAG = re.compile(r"step_\d{8}")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (a marker that parses), oldest first. Contents are checked on load."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and TAG.fullmatch(path.name) and (path / MARKER).is_file():
            try:
                json.loads((path / MARKER).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                log.warning("checkpoint %s: %s is unreadable; not a complete checkpoint", path.name, MARKER)
                continue
            found.append(path)
    return found


def file_entry(file: Path) -> dict:
    """A manifest entry: size and SHA-256, or that the file is missing."""
    return {"size": file.stat().st_size, "sha256": sha256_file(file)} if file.is_file() else {"missing": True}


def check_base(pointer: dict, model_dir: Path, current: dict | None = None) -> None:
    """The base a checkpoint points at must be `model_dir`'s content (its path may have changed): a one-line error
    naming the first file that differs, and how to point at the right base."""
    model_dir = Path(model_dir)
    if current is None:
        current = {name: file_entry(model_dir / name) for name in pointer["files"]}
    for name, expected in pointer["files"].items():
        got = current.get(name)
        if got is None or "missing" in got:
            problem = f"{name} is missing"
        elif got["size"] != expected["size"] or got["sha256"] != expected["sha256"]:
            problem = (
                f"{name} differs (size {got['size']} vs {expected['size']}, SHA-256 {got['sha256'][:12]}… vs "
                f"{expected['sha256'][:12]}…)"
            )
        else:
            continue
        raise InputError(
            f"base model: the checkpoint was trained from {pointer['path']}, and {model_dir} is not that model: "
            f"{problem}; point train.model (or --base) at the original base, wherever it is now"
        )


def verify_files(path: Path, marker: dict, files: dict[str, dict] | None = None) -> str | None:
    """What is wrong with `path` against its manifest, or None. `files`: freshly measured entries (else measured
    here, single process)."""
    for name, expected in marker["files"].items():
        if isinstance(expected, int):  # manifests before checksums: sizes only
            expected = {"size": expected}
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = files[name] if files is not None else file_entry(file)
        if actual.get("size") != expected["size"]:
            return f"{name} has {actual.get('size')} bytes, the manifest says {expected['size']} (truncated?)"
        if "sha256" in expected and actual.get("sha256") != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def expert_layout_of(model) -> dict:
    """The expert layout a checkpoint belongs to (all None for a dense model: the full fine-tune baseline); a model
    or its config."""
    config = getattr(model, "config", model)
    if not hasattr(config, "experts_per_layer"):
        return {"experts_per_layer": None, "expert_groups": None, "classifier_layers": None}
    return {
        "experts_per_layer": list(config.experts_per_layer),
        "expert_groups": [list(g) for g in config.expert_groups],
        "classifier_layers": list(config.classifier_layers),
    }


def model_slots(model) -> dict[int, list[int]]:
    """Layer → the expert id in each DeepSpeed slot of an expert-parallel training model (what a checkpoint
    records; empty for a dense model)."""
    return {layer: list(block.moe.placement) for layer, block in moe_blocks(model).items()}


def checkpoint_slots(marker: dict) -> dict[int, list[int]]:
    """Layer → the expert id in each slot of a checkpoint's expert files. A marker written before checkpoints
    recorded the table: derived from its layout and ep sizes, with the placement rule that wrote it."""
    if "expert_slots" in marker:
        return {int(layer): list(ids) for layer, ids in marker["expert_slots"].items()}
    groups = (marker.get("layout") or {}).get("expert_groups")
    if not groups:
        return {}
    return {int(layer): expert_placement(groups[int(layer)][1:], int(ep)) for layer, ep in marker["ep_sizes"].items()}
