"""Checkpoints through DeepSpeed (every rank calls save/load) plus our completion marker.

DeepSpeed writes `latest` from rank 0 before its final barrier, so it can point at a torn checkpoint. A checkpoint
here counts only once `COMPLETE.json` exists in its directory: written atomically by rank 0 after a barrier that
every rank reaches only when its own files (DeepSpeed's and its RNG state) are on disk. The marker holds the step,
the data position, the model's expert layout and a manifest of file sizes. Older complete checkpoints beyond
`keep_last_n` are deleted only after the newer one is complete.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from layermoe_ds.io import atomic_write_bytes, read_json, write_json

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def layout_of(model) -> dict:
    config = model.config
    return {
        "experts_per_layer": list(config.experts_per_layer),
        "expert_groups": [list(g) for g in config.expert_groups],
        "classifier_layers": list(config.classifier_layers),
    }


def save(engine, run_dir: Path, step: int, state: dict, keep_last_n: int) -> Path:
    """Save on every rank; rank 0 marks the checkpoint complete after a barrier and prunes older ones."""
    rank = dist.get_rank()
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"layermoe": state})
    buffer = io.BytesIO()
    torch.save({"torch": torch.get_rng_state()}, buffer)
    atomic_write_bytes(root / tag / f"rng_rank{rank:04d}.pt", buffer.getvalue())
    dist.barrier()
    if rank == 0:
        files = {
            str(p.relative_to(root / tag)): p.stat().st_size for p in sorted((root / tag).rglob("*")) if p.is_file()
        }
        write_json(root / tag / MARKER, {"step": step, "world_size": dist.get_world_size(), **state, "files": files})
        for old in complete_checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s complete (%d files)", tag, len(files))
    dist.barrier()
    return root / tag


def check_compatible(marker: dict, model, path: Path) -> None:
    """Refuse a checkpoint made for another expert layout (allocation) before anything is loaded."""
    ours = layout_of(model)
    theirs = {key: marker.get("layout", {}).get(key) for key in ours}
    if theirs != ours:
        raise ValueError(
            f"checkpoint {path} was made for another allocation: experts per layer "
            f"{theirs['experts_per_layer']} vs this model's {ours['experts_per_layer']} "
            "(use a new run directory)"
        )


def verify_files(path: Path, marker: dict) -> None:
    for name, size in marker["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise ValueError(f"checkpoint {path}: {name} is missing or has the wrong size (torn or corrupted)")


def load_latest(engine, run_dir: Path, model) -> dict | None:
    """Load the newest complete checkpoint (model, optimizer, scheduler, RNG); returns our state or None."""
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return None
    path = checkpoints[-1]
    marker = read_json(path / MARKER, "checkpoint marker")
    check_compatible(marker, model, path)
    verify_files(path, marker)
    same_world = marker["world_size"] == dist.get_world_size()
    if not same_world:
        log.warning(
            "checkpoint %s was written by %d ranks, resuming on %d: model weights and the training "
            "position carry over, optimizer and scheduler state do not (DeepSpeed cannot reshard native "
            "MoE optimizer state)",
            path.name,
            marker["world_size"],
            dist.get_world_size(),
        )
    engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=same_world, load_lr_scheduler_states=same_world
    )
    rng_file = path / f"rng_rank{dist.get_rank():04d}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=False)["torch"])
    log.info("resumed from %s (step %d)", path.name, marker["step"])
    return marker
