"""A training run's checkpoints, read without DeepSpeed or a process group: which are complete (`COMPLETE.json`,
the marker rank 0 writes last), whether their files match their manifest, and the model they hold
(`model_from_checkpoint`, for export and evaluation). Writing and resuming them is `training/checkpoint.py`'s."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from layermoe_ds.ds.names import EXPERT_FILES, MODEL_FILE, disk_name
from layermoe_ds.ds.placement import checkpoint_slots
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.io import read_json, sha256_file
from layermoe_ds.modeling.base_tensors import base_loader
from layermoe_ds.modeling.hf_loading import carry_generation_config
from layermoe_ds.modeling.materialize import materialize, parameters_on_meta
from layermoe_ds.modeling.streaming import ShardWriter, saved_keys, write_model_dir
from layermoe_ds.modeling.types import layermoe_classes, layermoe_model_type, model_config

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
    unexpected = sorted(set(trained) - set(model.state_dict()))
    if unexpected:
        raise InputError(f"checkpoint {path} does not match its config.json: unexpected {unexpected[:3]}")

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
