"""The end of a stage on every rank: the trained model as a Hugging Face directory, written by rank 0 from the
expert-parallel shards without a second copy of the model (`export_model`); and the config and tokenizer each
checkpoint carries so that it exports on its own (`write_model_files`)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from layermoe_ds.ds.internals import expert_data_parallel_rank
from layermoe_ds.ds.names import disk_name, new_expert_index
from layermoe_ds.hf.files import ShardWriter, saved_keys, write_model_dir
from layermoe_ds.hf.load import check_tensors
from layermoe_ds.modeling.families import Layout
from layermoe_ds.modeling.types import layermoe_classes, moe_blocks

log = logging.getLogger("layermoe.train")


def consolidated_tensors(model):
    """The full (ep_size 1) model's tensors under their names on disk (`ds/names.py`), yielded on rank 0 in pieces
    (None on the other ranks, which take part): first everything but the new experts (rank 0's own tensors, not
    copies), then layer by layer each expert under its id. Each expert travels once (from expert-data-parallel rank
    0 of its group: the other replicas hold the same weights) and only to rank 0 (`gather_object`), so rank 0 holds
    its model plus one layer's experts."""
    rank = dist.get_rank()
    if rank == 0:
        yield {disk_name(k): v.detach() for k, v in model.state_dict().items() if new_expert_index(k) is None}
    else:
        yield None
    for layer, block in model.moe_blocks().items():
        local = {}
        if expert_data_parallel_rank(block.moe.expert_group_name) == 0:
            for local_id, expert in enumerate(block.moe.experts):
                prefix = Layout.of(model.config).expert(layer, block.moe.global_ids[local_id] + 1)
                for name, tensor in expert.state_dict().items():
                    # A copy, not `.cpu()`: under ZeRO each parameter is a view into one flat buffer of every
                    # trainable tensor, and pickling a view pickles that whole buffer (measured: 23 GB on rank 0,
                    # OOM-killed, for 52M trainable parameters on CPU, where `.cpu()` returns the view itself).
                    local[f"{prefix}.{name}"] = tensor.detach().to("cpu", copy=True)
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        yield {k: v for part in gathered for k, v in part.items()} if rank == 0 else None
    # No rank leaves before rank 0 has every piece (it comes here once it has written the last one): a sender that
    # exits with the gather's data still in flight may reset the connection under it (seen as a rank aborting at
    # the end of a run, exit 250 from the launcher).
    dist.barrier()


def write_model_files(model, tokenizer, directory: Path, stage: int) -> None:
    """config.json (as the export will set it), the tokenizer and the generation settings, so a checkpoint exports
    on its own."""
    config = copy.deepcopy(model.config)
    if moe_blocks(model):
        config.classifier_routing = stage == 2
    config.save_pretrained(directory)
    _save_beside(model, tokenizer, directory)


def _save_beside(model, tokenizer, directory: Path) -> None:
    """What a model directory holds besides config and weights: the tokenizer, and the generation settings the
    base model came with (`generation_config.json`)."""
    tokenizer.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)


def export_model(model, tokenizer, out: Path, stage: int, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write the trained model as an HF directory on rank 0, in the run's precision (bf16 stays bf16), sharded:
    LayerMoE with classifier routing on after stage 2, or a dense full fine-tune as the dense model it is (ZeRO 1/2
    keep every parameter whole on every rank). Streamed: no second copy of the model, no random initialisation.
    The other ranks wait only until the last piece has arrived (`consolidated_tensors`), not for the writing: no
    collective waits on the export, however long writing a large model takes."""
    rank = dist.get_rank()
    if not moe_blocks(model):
        if rank == 0:
            write_model_dir(out, model.config, type(model), lambda d: _write_all(d, model, tokenizer, max_shard_bytes))
            log.info("exported %s", out)
        return
    config = model.config
    config.classifier_routing = stage == 2
    pieces = consolidated_tensors(model)
    if rank != 0:
        for _ in pieces:  # take part in every gather
            pass
        return
    _, model_cls = layermoe_classes(config.model_type)
    with torch.device("meta"):
        expected = saved_keys(model_cls(config))  # what a LayerMoE directory holds (tied copies left out)
    # The layout, in the order the tensors arrive: rank 0's own tensors, then each layer's gathered experts in
    # global-id order (their dtype: this rank's experts' of that layer, the run's precision).
    own = {disk_name(name): t for name, t in model.state_dict().items() if new_expert_index(name) is None}
    layout = [(name, tuple(t.shape), t.dtype) for name, t in own.items() if name in expected]
    for layer, block in model.moe_blocks().items():
        local = block.moe.experts[0].state_dict()
        for expert_id in range(1, len(block.gate.expert_groups)):
            prefix = Layout.of(config).expert(layer, expert_id)
            layout += [(f"{prefix}.{sub}", tuple(t.shape), t.dtype) for sub, t in local.items()]
    shapes = {name: shape for name, (shape, _) in expected.items()}
    check_tensors(shapes, {name: shape for name, shape, _ in layout}, "export: the trained model's tensors")

    def write(directory: Path) -> None:
        writer = ShardWriter(directory, layout, max_shard_bytes)
        order = [name for name, _, _ in layout]
        position = 0
        for piece in pieces:
            count = sum(1 for name in piece if name in expected)
            for name in order[position : position + count]:  # this piece's tensors, in the layout's order
                writer.write(name, piece[name])
            position += count
        writer.close()
        _save_beside(model, tokenizer, directory)

    write_model_dir(out, config, model_cls, write)
    log.info("exported %s", out)


def _write_all(directory: Path, model, tokenizer, max_shard_bytes: int) -> None:
    state = model.state_dict()
    names = list(saved_keys(model))
    writer = ShardWriter(directory, [(n, tuple(state[n].shape), state[n].dtype) for n in names], max_shard_bytes)
    for name in names:
        writer.write(name, state[name])
    writer.close()
    _save_beside(model, tokenizer, directory)
