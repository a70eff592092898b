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

import contextlib
import errno
import io
import logging
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from layermoe_ds.checkpoints.format import (
    MARKER,
    check_base,
    checkpoint_root,
    checkpoint_slots,
    complete_checkpoints,
    expert_layout_of,
    file_entry,
    tag_for,
    verify_files,
)
from layermoe_ds.ds.internals import moe_files_hidden, refresh_master_weights
from layermoe_ds.ds.names import expert_file, expert_optimizer_file, training_expert_prefix
from layermoe_ds.errors import InputError, OutputWriteError
from layermoe_ds.io import atomic_write_bytes, read_json, write_json
from layermoe_ds.modeling.families import Layout
from layermoe_ds.modeling.types import moe_blocks

log = logging.getLogger(__name__)


def _manifest_share(directory: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share of `names` (every world_size-th), gathered on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for name in names[rank::world]:
        file = directory / name
        mine[name] = file_entry(file)
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in part.items()}


def save(engine, run_dir: Path, step: int, state: dict, keep_last_n: int, model_files=None) -> Path:
    """Save on every rank; rank 0 marks the checkpoint complete after a barrier and prunes older ones.

    Slim: what training changes (the trainable tensors — in stage 1 through DeepSpeed's per-expert files — the
    optimizer, the scheduler, the RNG, the sampler) and, in `state["base"]`, the pointer to the frozen base. A
    gates-only run (stage 2) hides the MoE layers from DeepSpeed for the save, which would otherwise write every
    frozen expert to a file of its own. `model_files(directory)` (rank 0) writes config.json and the tokenizer.
    """
    started = time.perf_counter()
    rank = dist.get_rank()
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    if rank == 0 and (root / tag).exists():  # a torn save of this step, or one whose files went bad: start clean
        shutil.rmtree(root / tag)
    dist.barrier()
    try:
        with moe_files_hidden(engine, state.get("gates_only", False)), _frozen_left_out(engine.module):
            engine.save_checkpoint(str(root), tag=tag, client_state={"layermoe": state}, exclude_frozen_parameters=True)
        buffer = io.BytesIO()
        torch.save({"torch": torch.get_rng_state()}, buffer)
        atomic_write_bytes(root / tag / f"rng_rank{rank:04d}.pt", buffer.getvalue())
        if rank == 0 and model_files is not None:
            model_files(root / tag)
    except OSError as exc:
        raise write_failed(f"checkpoint {root / tag}", exc, run_dir) from exc
    dist.barrier()
    names = sorted(str(p.relative_to(root / tag)) for p in (root / tag).rglob("*") if p.is_file())
    files = _manifest_share(root / tag, names)
    if rank == 0:
        seconds = round(time.perf_counter() - started, 3)  # writing and hashing, as the run waited for them
        marker = {"step": step, "world_size": dist.get_world_size(), **state, "save_seconds": seconds, "files": files}
        write_json(root / tag / MARKER, marker)
        for old in complete_checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s complete (%d files)", tag, len(files))
    dist.barrier()
    return root / tag


def write_failed(what: str, exc: OSError, run_dir: Path) -> OutputWriteError:
    """The one-line error for `what` not written in `run_dir`: why, and which complete checkpoint a rerun of the same
    command resumes from."""
    newest = complete_checkpoints(run_dir)
    kept = f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else "no complete one exists"
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
    return OutputWriteError(
        f"{what} could not be written ({reason}: {exc.filename or exc}); {kept}; free space and rerun the same "
        "command to resume"
    )


@contextlib.contextmanager
def _frozen_left_out(model):
    """The model's state dict without frozen tensors, aliases included: DeepSpeed's `exclude_frozen_parameters`
    removes names from `named_parameters()`, which lists a tied tensor once, so a tied LM head (vocabulary × hidden)
    would stay in every checkpoint."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    handle = model.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


BASE_SUFFIXES = (".safetensors", ".safetensors.index.json", "config.json")


def base_pointer(model_dir: Path, allocation: dict | None, seed: int | None = None) -> dict:
    """What a slim checkpoint needs to rebuild the frozen tensors: the base directory, every weight and config
    file's size and SHA-256 (hashed by the ranks together), and for a dense base the allocation it is upcycled with
    and the seed of the routers' and classifiers' initialisation (a frozen classifier is in no checkpoint)."""
    model_dir = Path(model_dir).resolve()
    names = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(BASE_SUFFIXES) and p.is_file())
    files = (
        _manifest_share(model_dir, names) if dist.is_initialized() else {n: file_entry(model_dir / n) for n in names}
    )
    pointer = {"path": str(model_dir), "allocation": allocation, "files": files}
    return pointer if allocation is None else {**pointer, "seed": seed}


def check_compatible(marker: dict, model, path: Path) -> None:
    """Refuse a checkpoint made for another expert layout (allocation) before anything is loaded."""
    ours = expert_layout_of(model)
    theirs = {key: marker.get("layout", {}).get(key) for key in ours}
    if theirs != ours:
        raise InputError(
            f"checkpoint {path} was made for another allocation: experts per layer "
            f"{theirs['experts_per_layer']} vs this model's {ours['experts_per_layer']} "
            "(use a new run directory)"
        )


def _experts_by_id(engine, model, path: Path, saved: dict[int, list[int]], optimizer_loaded: bool) -> None:
    """DeepSpeed loads each expert slot from the file of the same slot. Where this run's placement (another world
    or expert-parallel size) puts another expert in a slot than the saving run's did, each of this rank's experts is
    read again from the file of the slot that held it, and the optimizer's fp32 copies follow the weights."""
    moved = False
    # DeepSpeed numbers its expert files by the order of the MoE modules, which is layer order.
    for ordinal, (layer, block) in enumerate(sorted(moe_blocks(model).items())):
        moe = block.moe
        for local, expert_id in enumerate(moe.global_ids):
            slot = saved[layer].index(expert_id)
            if slot == moe.placement.index(expert_id):
                continue
            file = path / expert_file(ordinal, slot)
            state = torch.load(file, map_location="cpu", weights_only=False)
            prefix = training_expert_prefix(Layout.of(model.config).ffn(layer), slot)
            with torch.no_grad():
                for name, tensor in moe.experts[local].state_dict().items():
                    tensor.copy_(state[prefix + name])
            moved = True
    if moved:
        # Only a fresh optimizer meets a new placement: optimizer state is never carried across ep sizes.
        assert not optimizer_loaded, "expert slots moved while the optimizer state was loaded"
        refresh_master_weights(engine)  # ZeRO and bf16 keep fp32 master copies of the trained weights
        log.info("experts placed by id: this run puts other experts in some slots than %s did", path.name)


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


def load_latest(
    engine, run_dir: Path, model, scheduler=None, reshardable: bool = False, base: tuple[Path, dict] | None = None
) -> dict | None:
    """Load the newest valid checkpoint (model, optimizer, scheduler, RNG); returns our state or None. `base`:
    (the run's base directory, its files' sizes and SHA-256), checked against a slim checkpoint's pointer.

    On another world size the model weights, data position and step carry over; optimizer state only when
    `reshardable` (nothing ZeRO-partitioned or expert-parallel is trained: stage 2), else it starts fresh (DeepSpeed
    cannot reshard native MoE optimizer state) and the learning-rate schedule is moved to the saved step.
    """
    found = newest_valid(run_dir)
    if found is None:
        return None
    path, marker = found
    check_compatible(marker, model, path)
    if base is not None and "base" in marker:  # the frozen tensors the run was built from are the checkpoint's
        check_base(marker["base"], base[0], base[1])
    gates_only = marker.get("gates_only", False)
    same_world = marker["world_size"] == dist.get_world_size()
    reshardable = reshardable or gates_only
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
    # Without ZeRO, DeepSpeed keeps MoE optimizer state per expert-parallel rank (`expert_optimizer_file`); the
    # gate state there is replicated, so a rank the writing run did not have takes expert-parallel rank 0's.
    own = path / expert_optimizer_file(dist.get_rank())
    borrow = reshardable and not gates_only and not same_world and not own.is_file()
    with moe_files_hidden(engine, gates_only):
        engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=load_optimizer and not borrow,
            load_lr_scheduler_states=load_optimizer,
            load_module_strict="base" not in marker,  # a slim checkpoint holds the trainable tensors only
        )
    if not gates_only:
        _experts_by_id(engine, model, path, checkpoint_slots(marker), load_optimizer)
    if borrow:
        donor = torch.load(path / expert_optimizer_file(0), map_location="cpu", weights_only=False)
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
