"""Checkpoints through DeepSpeed (every rank calls save/load) plus our completion marker.

DeepSpeed writes `latest` from rank 0 before its final barrier, so it can point at a torn checkpoint. A checkpoint
here counts only once `COMPLETE.json` exists in its directory: written atomically by rank 0 after a barrier that
every rank reaches only when its own files (DeepSpeed's, its RNG state, the model config and tokenizer) are on disk.
The marker holds the step, the data position, the model's expert layout and a manifest of every file's size and
SHA-256 (the ranks hash their share of the files in parallel). On resume the newest checkpoint whose files match
its manifest is used; one that does not (a file truncated, deleted or corrupted afterwards) is renamed
`<tag>.corrupt` and the next older one is tried. Older complete checkpoints beyond `keep_last_n` are deleted only
after the newer one is complete. A failed write (disk full) leaves no marker and stops the run with one line.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from layermoe_ds.io import atomic_write_bytes, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


TAG = re.compile(r"step_\d{8}")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops, nothing is marked."""


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


def layout_of(model) -> dict:
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


def _manifest_share(directory: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share of `names` (every world_size-th), gathered on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for name in names[rank::world]:
        file = directory / name
        mine[name] = {"size": file.stat().st_size, "sha256": sha256_file(file)} if file.is_file() else {"missing": True}
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in part.items()}


def save(engine, run_dir: Path, step: int, state: dict, keep_last_n: int, model_files=None) -> Path:
    """Save on every rank; rank 0 marks the checkpoint complete after a barrier and prunes older ones.

    `model_files(directory)` (rank 0) writes what an export needs besides weights: config.json and the tokenizer.
    """
    rank = dist.get_rank()
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    if rank == 0 and (root / tag).exists():  # a torn save of this step, or one whose files went bad: start clean
        shutil.rmtree(root / tag)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"layermoe": state})
        buffer = io.BytesIO()
        torch.save({"torch": torch.get_rng_state()}, buffer)
        atomic_write_bytes(root / tag / f"rng_rank{rank:04d}.pt", buffer.getvalue())
        if rank == 0 and model_files is not None:
            model_files(root / tag)
    except OSError as exc:
        newest = complete_checkpoints(run_dir)
        kept = f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else "no complete one exists"
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
        raise CheckpointWriteError(
            f"checkpoint {root / tag} could not be written ({reason}: {exc.filename or exc}); {kept}; "
            "free space and rerun the same command to resume"
        ) from exc
    dist.barrier()
    names = sorted(str(p.relative_to(root / tag)) for p in (root / tag).rglob("*") if p.is_file())
    files = _manifest_share(root / tag, names)
    if rank == 0:
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


def verify_files(path: Path, marker: dict, files: dict[str, dict] | None = None) -> str | None:
    """What is wrong with `path` against its manifest, or None. `files`: freshly measured entries (else measured
    here, single process)."""
    for name, expected in marker["files"].items():
        if isinstance(expected, int):  # manifests before checksums: sizes only
            expected = {"size": expected}
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = files[name] if files is not None else {"size": file.stat().st_size, "sha256": sha256_file(file)}
        if actual.get("size") != expected["size"]:
            return f"{name} has {actual.get('size')} bytes, the manifest says {expected['size']} (truncated?)"
        if "sha256" in expected and actual.get("sha256") != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def newest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint whose files match its manifest (checked by all ranks together); a bad one
    is renamed `<tag>.corrupt` (rank 0) and the next older one tried."""
    for path in reversed(complete_checkpoints(run_dir)):
        marker = read_json(path / MARKER, "checkpoint marker")
        measured = _manifest_share(path, sorted(marker["files"]))
        problem = verify_files(path, marker, measured)
        if problem is None:
            return path, marker
        dist.barrier()
        if dist.get_rank() == 0:
            path.rename(path.with_name(path.name + ".corrupt"))
            log.warning("checkpoint %s is damaged (%s): moved to %s.corrupt, trying the previous one",
                        path.name, problem, path.name)  # fmt: skip
        dist.barrier()
    return None


def load_latest(engine, run_dir: Path, model, scheduler=None, reshardable: bool = False) -> dict | None:
    """Load the newest valid checkpoint (model, optimizer, scheduler, RNG); returns our state or None.

    On another world size the model weights, data position and step carry over; optimizer state only when
    `reshardable` (nothing ZeRO-partitioned or expert-parallel is trained: stage 2), else it starts fresh (DeepSpeed
    cannot reshard native MoE optimizer state) and the learning-rate schedule is moved to the saved step.
    """
    found = newest_valid(run_dir)
    if found is None:
        return None
    path, marker = found
    check_compatible(marker, model, path)
    same_world = marker["world_size"] == dist.get_world_size()
    load_optimizer = same_world or reshardable
    if not same_world:
        log.warning(
            "checkpoint %s was written by %d ranks, resuming on %d: model weights, data position and step carry "
            "over; %s",
            path.name,
            marker["world_size"],
            dist.get_world_size(),
            "optimizer state carries over too (only replicated router/classifier weights are trained)"
            if reshardable
            else "optimizer state does NOT (DeepSpeed cannot reshard ZeRO-partitioned or expert-parallel MoE "
            "optimizer state): Adam moments restart from zero",
        )
    # Without ZeRO, DeepSpeed keeps MoE optimizer state per expert-parallel rank (expp_rank_R_…); the gate state
    # there is replicated, so a rank the writing run did not have takes expert-parallel rank 0's.
    own = path / f"expp_rank_{dist.get_rank()}_mp_rank_00_optim_states.pt"
    borrow = reshardable and not same_world and not own.is_file()
    engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_optimizer_states=load_optimizer and not borrow,
        load_lr_scheduler_states=load_optimizer,
    )
    if borrow:
        donor = torch.load(path / "expp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
        engine.optimizer.load_state_dict(donor["optimizer"])
    if not load_optimizer and scheduler is not None:  # continue the schedule at the saved step
        scheduler.last_epoch = marker["step"] - 1
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    rng_file = path / f"rng_rank{dist.get_rank():04d}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=False)["torch"])
    log.info("resumed from %s (step %d)", path.name, marker["step"])
    return marker


def consolidated_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The full (ep_size 1) state dict of a DeepSpeed MoE checkpoint: the dense part of `mp_rank_00_model_states.pt`
    updated with every `layer_*_expert_*` file (DeepSpeed stores those under global expert ids). No DeepSpeed, no
    process group; `zero_to_fp32` does not handle expert files."""
    path = Path(path)
    dense = path / "mp_rank_00_model_states.pt"
    if not dense.is_file():
        raise FileNotFoundError(f"checkpoint: {path} has no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    state = dict(torch.load(dense, map_location="cpu", weights_only=False)["module"])
    for expert_file in sorted(path.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=False))
    return state


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path} is neither a complete checkpoint (no {MARKER}) nor a run directory with one under checkpoints/"
        )
    return found[-1]


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() or bool(complete_checkpoints(path))


def model_from_checkpoint(path: Path) -> tuple[torch.nn.Module, Path, dict]:
    """(model in fp32 on CPU, the checkpoint directory, its marker) from a checkpoint or run directory, after
    verifying the files against the manifest: a LayerMoE model, or the dense model of a full fine-tune run. Needs
    neither DeepSpeed nor a process group."""
    from layermoe_ds.modeling.hf_export import layermoe_model_type
    from layermoe_ds.modeling.upcycle import LAYERMOE_TYPES

    path = resolve_checkpoint(path)
    marker = read_json(path / MARKER, "checkpoint marker")
    problem = verify_files(path, marker)
    if problem:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} has no config.json (saved before checkpoints carried one)")
    model_type = layermoe_model_type(path)
    if model_type is None:  # the dense full fine-tune baseline
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    else:
        config_cls, model_cls = LAYERMOE_TYPES[model_type]
        model = model_cls(config_cls.from_pretrained(path))
    state = consolidated_from_checkpoint(path)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config.json: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model.eval(), path, marker
