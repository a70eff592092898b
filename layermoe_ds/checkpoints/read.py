"""A training run's checkpoints read without DeepSpeed or a process group: the newest complete one of a run, checked
against its manifest, consolidated into one state dict under the names on disk, and the model it holds
(`model_from_checkpoint`, `export_checkpoint`: export and evaluation). The format is `format.py`'s; saving and
resuming, `save_load.py`'s."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from layermoe_ds.checkpoints.format import MARKER, check_base, checkpoint_slots, complete_checkpoints, verify_files
from layermoe_ds.ds.names import EXPERT_FILES, MODEL_FILE, disk_name
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.hf.files import ShardWriter, saved_keys, write_model_dir
from layermoe_ds.hf.load import carry_generation_config, check_tensors
from layermoe_ds.hf.materialize import materialize, parameters_on_meta
from layermoe_ds.io import read_json
from layermoe_ds.modeling.base_tensors import base_loader
from layermoe_ds.modeling.types import layermoe_classes, layermoe_model_type, model_config

log = logging.getLogger(__name__)


def consolidated_from_checkpoint(path: Path, marker: dict | None = None) -> dict[str, torch.Tensor]:
    """The full (ep_size 1) state dict of a DeepSpeed MoE checkpoint under the names on disk (`ds/names.py`): the
    dense part of `mp_rank_00_model_states.pt` with every `layer_*_expert_*` file, each expert under its own id
    (DeepSpeed names expert tensors by slot; the marker's slot table says which expert a slot held). No DeepSpeed,
    no process group; `zero_to_fp32` does not handle expert files."""
    path = Path(path)
    dense = path / MODEL_FILE
    if not dense.is_file():
        raise MissingInputError(f"checkpoint: {path} has no {MODEL_FILE} (not a DeepSpeed checkpoint)")
    if marker is None:
        marker = read_json(path / MARKER, "checkpoint marker")
    slots = checkpoint_slots(marker)
    state = {disk_name(k): v for k, v in torch.load(dense, map_location="cpu", weights_only=False)["module"].items()}
    for expert_file in sorted(path.glob(EXPERT_FILES)):
        for name, tensor in torch.load(expert_file, map_location="cpu", weights_only=False).items():
            state[disk_name(name, slots)] = tensor
    return state


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise MissingInputError(
            f"{path} is neither a complete checkpoint (no {MARKER}) nor a run directory with one under checkpoints/"
        )
    return found[-1]


def _upcycle_seed(pointer: dict, path: Path) -> int:
    """The seed a run from a dense base initialised the routers and classifiers with: its pointer's, or (older
    checkpoints) its run directory's resolved config."""
    if pointer.get("seed") is not None:
        return int(pointer["seed"])
    resolved = path.parent.parent / "resolved_config.json"
    if resolved.is_file():
        return int(read_json(resolved, "resolved config")["train"]["seed"])
    raise InputError(
        f"checkpoint {path}: it was trained from the dense base {pointer['path']}, and neither its marker nor a "
        f"{resolved} records the seed its untrained routers and classifiers were initialised with"
    )


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() or bool(complete_checkpoints(path))


@dataclass
class CheckpointModel:
    """A checkpoint read for export or evaluation: its model on meta (shapes only) and where each tensor comes from
    (`tensor(name, meta_param)`: the checkpoint's trained tensors, else its base)."""

    skeleton: torch.nn.Module
    config: object
    model_cls: Callable
    tensor: Callable[[str, torch.nn.Parameter], torch.Tensor]
    path: Path
    marker: dict


def model_from_checkpoint(
    path: Path, base_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Path, dict]:
    """(model in `dtype` on CPU, each tensor read straight into it, the checkpoint directory, its marker) from a
    checkpoint or run directory (`read_checkpoint`). Needs neither DeepSpeed nor a process group."""
    source = read_checkpoint(path, base_dir)
    model = source.skeleton
    materialize(model, source.tensor, lambda name, param: dtype)
    carry_generation_config(model, source.path)
    return model.eval(), source.path, source.marker


def export_checkpoint(
    path: Path, out: Path, base_dir: Path | None = None, dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 10**9,
) -> tuple[Path, dict]:  # fmt: skip
    """A checkpoint as a Hugging Face directory in `dtype`, streamed: each tensor read (from the checkpoint or its
    base), cast and written in turn, so what is held is the checkpoint's trained tensors and one more, never the
    whole model; the tokenizer and generation settings copied from the checkpoint. Returns (checkpoint, marker)."""
    source = read_checkpoint(path, base_dir)
    state = source.skeleton.state_dict(keep_vars=True)
    names = list(saved_keys(source.skeleton))
    layout = [(name, tuple(state[name].shape), dtype) for name in names]
    source.config.dtype = dtype

    def make(name: str) -> torch.Tensor:
        entry = state[name]
        return source.tensor(name, entry) if isinstance(entry, torch.nn.Parameter) else entry

    def write(directory: Path) -> None:
        writer = ShardWriter(directory, layout, max_shard_bytes)
        for name in names:
            writer.write(name, make(name))
        writer.close()

    write_model_dir(out, source.config, source.model_cls, write, tokenizer_from=source.path)
    return source.path, source.marker


def read_checkpoint(path: Path, base_dir: Path | None = None) -> CheckpointModel:
    """A checkpoint or run directory, its files verified against the manifest: a LayerMoE model, or the dense model
    of a full fine-tune run. A slim checkpoint's frozen tensors come from its base (the path it recorded, or
    `base_dir` when the base has moved), checked against its pointer."""
    path = resolve_checkpoint(path)
    marker = read_json(path / MARKER, "checkpoint marker")
    problem = verify_files(path, marker)
    if problem:
        raise InputError(f"checkpoint {path} is damaged: {problem}")
    if not (path / "config.json").is_file():
        raise MissingInputError(f"checkpoint {path} has no config.json (saved before checkpoints carried one)")
    model_type = layermoe_model_type(path)
    if model_type is None:  # the dense full fine-tune baseline
        config, model_cls = model_config(path), AutoModelForCausalLM.from_config
    else:
        config_cls, layermoe_cls = layermoe_classes(model_type)
        config, model_cls = config_cls.from_pretrained(path), layermoe_cls
    trained = consolidated_from_checkpoint(path, marker)
    with parameters_on_meta():
        model = model_cls(config)
    from_base = None
    if "base" in marker:  # slim: everything else from the base
        pointer = marker["base"]
        base_dir = Path(base_dir or pointer["path"])
        if not base_dir.is_dir():
            raise MissingInputError(
                f"checkpoint {path}: its base model {base_dir} is gone; give its new location with --base"
            )
        check_base(pointer, base_dir)
        # A run started from a dense base upcycled it on the fly: the base's own config says so, whatever the
        # pointer recorded (older checkpoints record `allocation: null` there).
        from_dense = model_type is not None and layermoe_model_type(base_dir) is None
        seed = _upcycle_seed(pointer, path) if from_dense else None
        from_base = base_loader(model, base_dir, from_dense, seed)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in trained.items()}
    check_tensors(expected, given, f"checkpoint {path} (its tensors against its config.json)", partial=True)

    def load(name: str, param: torch.nn.Parameter) -> torch.Tensor:
        if name in trained:
            return trained.pop(name)  # handed over: it is held once, by the model or the writer
        if from_base is None:
            raise InputError(f"checkpoint {path} does not match its config.json: {name} is missing")
        try:
            return from_base(name, param)
        except KeyError as exc:  # the base lacks a tensor the checkpoint's model needs
            raise InputError(f"checkpoint {path}: {name} is neither in it nor in its base ({exc.args[0]})") from None

    return CheckpointModel(model, config, model_cls, load, path, marker)
