"""Where a model comes from: one `load_model` for every source a verb accepts — a dense Hugging Face directory, a
LayerMoE directory, a DeepSpeed checkpoint or a training run's directory."""

from __future__ import annotations

from pathlib import Path

import torch

from layermoe_ds.checkpoints.format import MARKER
from layermoe_ds.checkpoints.read import is_checkpoint, model_from_checkpoint
from layermoe_ds.hf.load import check_model_dir, load_causal_lm


def is_checkpoint_source(path: Path) -> bool:
    """A checkpoint carries a config.json too; a run directory has none but holds checkpoints/."""
    path = Path(path)
    return (path / MARKER).is_file() or (not (path / "config.json").is_file() and is_checkpoint(path))


def check_source(path: Path) -> None:
    """Fail fast (before any data is read) on a path that is neither a model directory nor a checkpoint."""
    if not is_checkpoint_source(path):
        check_model_dir(path)


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", base: Path | None = None):
    """(model in eval mode, the directory holding its tokenizer, what was loaded) from a dense Hugging Face
    directory, a LayerMoE directory, a checkpoint or a run directory (its newest complete checkpoint; a slim one's
    frozen tensors from its base, or from `base` when the base has moved)."""
    path = Path(path)
    if is_checkpoint_source(path):
        model, checkpoint_dir, marker = model_from_checkpoint(path, base, dtype)
        described = f"checkpoint {checkpoint_dir} (step {marker['step']})"
        return model.to(device=device), checkpoint_dir, described
    return load_causal_lm(path, dtype, device), path, str(path)
