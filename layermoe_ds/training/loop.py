"""Stage 1 / stage 2 training on DeepSpeed: set-up, the step loop, checkpoints, signals and the final export.

Every check that can fail on user input runs before the first step. A SIGTERM/SIGINT (Slurm preemption, the
DeepSpeed launcher's shutdown) finishes the current step, saves a checkpoint and exits 0; `resume: auto` picks up
the newest complete checkpoint with the same data order and RNG state, so losses continue bit-identically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from layermoe_ds.config import TrainConfig, to_dict
from layermoe_ds.distributed import (
    RETURN_FREES_ENV,
    device_and_backend,
    init_process_group,
    release_shm_buffers,
    return_large_frees_to_os,
)
from layermoe_ds.io import read_json, write_json
from layermoe_ds.modeling.upcycle import is_layermoe, moe_blocks
from layermoe_ds.training.losses import stage_losses

log = logging.getLogger("layermoe.train")

RESOLVED = "resolved_config.json"
CENSUS = "rank_census.json"  # per rank: the tensors and bytes it materialised, the experts it holds per layer


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks after each step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: finishing this step, saving and exiting", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _check_run_dir(out: Path, resolved: dict) -> None:
    """A run directory holds one run: the same resolved config resumes, another one is refused."""
    path = out / RESOLVED
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") != resolved["fingerprint"]:
            old, new = existing.get("train", {}), resolved["train"]
            changed = [k for k in sorted(set(old) | set(new)) if k not in UNFINGERPRINTED and old.get(k) != new.get(k)]
            if existing.get("stage") != resolved["stage"]:
                changed.insert(0, "stage")
            if existing.get("deepspeed") != resolved["deepspeed"]:
                changed.append("the DeepSpeed config")
            raise FileExistsError(
                f"{out} already holds a different run (its {RESOLVED} differs in: {', '.join(changed) or 'version'}); "
                "use another --out or delete it"
            )


# Settings that may change between a run and its resumption: how it resumes and logs, where the directory is, and
# activation checkpointing (memory, not numbers: a run that ran out of memory resumes with it on), the
# process-group timeout, and the base model's path: a run's base is identified by its files' SHA-256, checked against
# the checkpoint's pointer on resume, so a moved base is found again by pointing `model` at it.
UNFINGERPRINTED = ("resume", "log_every", "out", "activation_checkpointing", "dist_timeout_minutes", "model")


def _fingerprint(train: dict, ds: dict, stage: int) -> str:
    stable = {k: v for k, v in train.items() if k not in UNFINGERPRINTED}
    text = json.dumps({"stage": stage, "train": stable, "ds": ds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(stage: int, config: TrainConfig, ds_config: dict) -> int:
    """Train `stage` (1 or 2) as configured; returns a process exit code."""

    from layermoe_ds.data.packing import BlockSampler
    from layermoe_ds.data.stage_data import stage_blocks
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.modeling.lm_loss import use_chunked_loss
    from layermoe_ds.training import checkpoint
    from layermoe_ds.training.build import build_model, check_model
    from layermoe_ds.training.engine import check_ds_config, initialize, model_dtype
    from layermoe_ds.training.metrics import MetricsLogger, RssPeak
    from layermoe_ds.training.swiglu import use_lean_swiglu

    process_start = psutil.Process().create_time()
    if device_and_backend()[0] == "cpu" and os.environ.get(RETURN_FREES_ENV) == "1":
        return_large_frees_to_os()  # before anything large is allocated (distributed.py says why, and its cost)
    # Stage 2 hands DeepSpeed an fp32 config (engine.py explains); the JSON's bf16 still sets the frozen precision.
    frozen_dtype = model_dtype(ds_config)
    ds_config = check_ds_config(ds_config, stage)
    out = Path(config.out)
    resolved = {"stage": stage, "train": to_dict(config), "deepspeed": ds_config}
    resolved["fingerprint"] = _fingerprint(resolved["train"], ds_config, stage)
    _check_run_dir(out, resolved)
    if config.resume == "no" and checkpoint.complete_checkpoints(out):
        raise FileExistsError(f"{out} has checkpoints and train.resume is 'no'; use another --out")
    model_config = check_model(config, stage)  # the model's files and settings, before anything else
    newest = checkpoint.complete_checkpoints(out)
    if newest and config.resume == "auto":  # refuse another allocation's checkpoint before anything is built
        marker = read_json(newest[-1] / checkpoint.MARKER, "checkpoint marker")
        checkpoint.check_compatible(marker, model_config, newest[-1])
    # Data before any process group: raw text is tokenized into the cache by the first rank to get there while the
    # others wait on its lock, not in a collective that could time out.
    tokenizer = load_tokenizer(Path(config.model))
    blocks = stage_blocks(config, stage, tokenizer, Path(config.model))

    device_name, backend = device_and_backend()
    rank, world = init_process_group(backend, device_name, config.dist_timeout_minutes)
    if backend == "gloo":  # every rank has mapped the CPU all-reduce segments by now: drop their names
        dist.barrier()
        release_shm_buffers()
    device = torch.device(device_name)
    torch.manual_seed(config.seed)
    built = build_model(config, stage, world, frozen_dtype, device)
    model, ep_sizes, trainable = built.model, built.ep_sizes, built.trainable
    micro = ds_config["train_micro_batch_size_per_gpu"]
    sampler = BlockSampler(len(blocks), micro, config.seed, rank, world)
    if config.activation_checkpointing:
        # Non-reentrant: the reentrant variant runs the forward without autograd, so the balance, LPR and
        # classifier losses the blocks record on the side (block.aux) would get no gradient (tested), and with
        # frozen embeddings a layer's input needs none either, which it needs to backpropagate at all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)  # the buffers (rotary frequencies, routing tables): the parameters were made there
    loss_chunk = use_chunked_loss(model)  # no [tokens × vocabulary] logits (lm_loss.py)
    use_lean_swiglu(model)  # two FFN activations kept for backward, not three (swiglu.py)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / RESOLVED,
            {**resolved, "ep_sizes": ep_sizes, "world_size": world, "data_tokens": blocks.tokens_per_lang},
        )
    engine, _, scheduler = initialize(model, trainable, config, ds_config)
    census: list = [None] * world  # with each rank's peak memory once set up (before the first step)
    own = {**built.census, "loss_chunk_tokens": loss_chunk, "setup_peak_mib": own_peak_memory_mib(device)}
    dist.all_gather_object(census, own)
    if rank == 0:
        write_json(out / CENSUS, {str(r): c for r, c in enumerate(census)})

    step = 0
    # Only replicated gate weights trained at ZeRO 0 (stage 2): optimizer state is valid on any world size, and
    # the checkpoint holds them alone.
    gates_only = ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and not any(
        ".deepspeed_experts." in name for name, p in model.named_parameters() if p.requires_grad
    )
    upcycled_from = read_json(Path(config.allocation), "allocation") if config.allocation else None
    base = checkpoint.base_pointer(Path(config.model), None if is_layermoe(model_config) else upcycled_from)
    marker = None
    if config.resume == "auto":
        marker = checkpoint.load_latest(engine, out, model, scheduler, gates_only, (Path(config.model), base["files"]))
    if marker is not None:
        step = marker["step"]
        sampler.load_state_dict(marker["sampler"])
    stop = StopFlag()
    metrics = MetricsLogger(out, rank, config.steps, step, config.log_every)
    accumulation = engine.gradient_accumulation_steps()
    while step < config.steps:
        started = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(accumulation):
            ids, labels = blocks.batch(sampler.next_indices())
            ids = ids.to(device)
            groups = labels[:, None].expand_as(ids).to(device)
            # No KV cache in training; and this step's outputs are dropped before the next forward, not kept
            # alive through it.
            output = engine(input_ids=ids, labels=ids, use_cache=False)
            losses = stage_losses(
                model, output.loss, groups, stage, config.balance_alpha, config.lpr_gamma, config.cls_eta
            )
            engine.backward(losses.total)
            engine.step()
            _accumulate(sums, model, losses, groups, accumulation)
            del output, losses
        step += 1
        scalars = _reduce_scalars(sums, device)
        scalars["lr"] = scheduler.get_last_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        scalars["tokens_per_s"] = world * accumulation * micro * config.seq_len / (time.perf_counter() - started)
        scalars["memory/peak_mib"] = peak_memory_mib(device)
        scalars["time/since_start_s"] = time.time() - process_start  # start-up cost shows in the first step
        metrics.step(step, scalars)
        stopping = stop.agreed(device)
        if step % config.save_every == 0 or step == config.steps or stopping:
            checkpoint.save(
                engine,
                out,
                step,
                {
                    "stage": stage,
                    "sampler": sampler.state_dict(),
                    "layout": checkpoint.layout_of(model),
                    "ep_sizes": ep_sizes,
                    "gates_only": gates_only,
                    "base": base,
                },
                config.keep_last_n,
                model_files=lambda directory: _write_model_files(model, tokenizer, directory, stage),
            )
        if stopping and step < config.steps:
            log.warning("stopped at step %d after a signal; rerun the same command to resume", step)
            metrics.close()
            return 0
    metrics.close()
    started = time.perf_counter()
    with RssPeak() as rss:
        export_model(model, tokenizer, out / "model", stage)
    if rank == 0:  # what the export itself took on the writing rank (host memory: the gathered experts)
        write_json(
            out / "export.json",
            {
                "seconds": round(time.perf_counter() - started, 3),
                "rss_before_mib": round(rss.before / 2**20, 1),
                "peak_rss_mib": round(rss.peak / 2**20, 1),
            },
        )
    return 0


def _accumulate(sums: dict[str, float], model, losses, groups: torch.Tensor, accumulation: int) -> None:
    """Per-step sums of what gets logged (divided by the accumulation steps; summed over ranks later)."""

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value) / accumulation

    add("loss/total", losses.total.detach())
    add("loss/ntp", losses.ntp.detach())
    add("loss/balance", losses.balance.detach())
    add("loss/lpr", losses.lpr.detach())
    add("loss/cls", losses.cls.detach())
    sums["classifier/correct"] = sums.get("classifier/correct", 0.0) + losses.cls_correct
    sums["classifier/count"] = sums.get("classifier/count", 0.0) + losses.cls_count
    old_tokens = groups.reshape(-1) == 0
    for layer, block in moe_blocks(model).items():
        aux = block.aux
        sums["moe/dropped"] = sums.get("moe/dropped", 0.0) + aux.dropped
        for e, load in enumerate(aux.expert_load_E.tolist()):
            key = f"moe/layer_{layer:02d}/expert_load/{e:02d}"
            sums[key] = sums.get(key, 0.0) + load
        # Share of old-language tokens whose top route is expert 0 (what stage 2 should raise).
        top = aux.router_log_probs_TE.argmax(dim=-1)
        key = f"routing/layer_{layer:02d}/old_to_expert0"
        sums[key + "/hits"] = sums.get(key + "/hits", 0.0) + float(((top == 0) & old_tokens).sum())
        sums[key + "/count"] = sums.get(key + "/count", 0.0) + float(old_tokens.sum())


def own_peak_memory_mib(device: torch.device) -> float:
    """This rank's peak memory so far, in MiB: allocated GPU memory (torch.cuda.max_memory_allocated), or on CPU the
    process's peak resident set (everything: libraries, model, optimizer, activations)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mib(device: torch.device) -> float:
    """The largest peak memory of any rank so far, in MiB (`own_peak_memory_mib`, max over ranks)."""
    value = torch.tensor([own_peak_memory_mib(device)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _reduce_scalars(sums: dict[str, float], device) -> dict[str, float]:
    """Average losses over ranks, add up counts, and turn hit/count pairs into shares."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    world = dist.get_world_size()
    totals = dict(zip(keys, values.tolist(), strict=True))
    scalars = {k: v / world for k, v in totals.items() if k.startswith("loss/")}
    scalars["moe/dropped"] = totals.get("moe/dropped", 0.0)
    for key, value in totals.items():
        if "/expert_load/" in key:
            scalars[key] = value
        elif key.endswith("/hits"):
            count = totals[key[: -len("/hits")] + "/count"]
            if count:
                scalars[key[: -len("/hits")]] = value / count
    if totals.get("classifier/count"):
        scalars["classifier/accuracy"] = totals["classifier/correct"] / totals["classifier/count"]
    return scalars


def consolidated_tensors(model):
    """The full (ep_size 1) model's tensors, yielded on rank 0 in pieces (None on the other ranks, which take part):
    first everything but the new experts (rank 0's own tensors, not copies), then layer by layer each expert under
    its global id. Each expert travels once (from expert-data-parallel rank 0 of its group: the other replicas hold
    the same weights) and only to rank 0 (`gather_object`), so rank 0 holds its model plus one layer's experts."""
    from deepspeed.utils import groups

    from layermoe_ds.modeling.upcycle import NEW_EXPERT_PREFIX

    rank = dist.get_rank()
    if rank == 0:
        yield {k: v.detach() for k, v in model.state_dict().items() if ".deepspeed_experts." not in k}
    else:
        yield None
    for layer, block in model.moe_blocks().items():
        local = {}
        if groups._get_expert_data_parallel_rank(block.moe.expert_group_name) == 0:
            for local_id, expert in enumerate(block.moe.experts):
                prefix = f"model.layers.{layer}.mlp.{NEW_EXPERT_PREFIX}.{block.moe.global_ids[local_id]}"
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


def _write_model_files(model, tokenizer, directory: Path, stage: int) -> None:
    """config.json (as the export will set it) and the tokenizer, so a checkpoint exports on its own."""
    config = copy.deepcopy(model.config)
    if moe_blocks(model):
        config.classifier_routing = stage == 2
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def export_model(model, tokenizer, out: Path, stage: int, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write the trained model as an HF directory on rank 0, in the run's precision (bf16 stays bf16), sharded:
    LayerMoE with classifier routing on after stage 2, or a dense full fine-tune as the dense model it is (ZeRO 1/2
    keep every parameter whole on every rank). Streamed: no second copy of the model, no random initialisation.
    The other ranks wait only until the last piece has arrived (`consolidated_tensors`), not for the writing: no
    collective waits on the export, however long writing a large model takes."""
    from layermoe_ds.modeling.streaming import ShardWriter, saved_keys, write_model_dir
    from layermoe_ds.modeling.upcycle import LAYERMOE_TYPES, NEW_EXPERT_PREFIX

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
    _, model_cls = LAYERMOE_TYPES[config.model_type]
    with torch.device("meta"):
        expected = saved_keys(model_cls(config))  # what a LayerMoE directory holds (tied copies left out)
    own = model.state_dict()
    # The layout, in the order the tensors arrive: rank 0's own tensors, then each layer's gathered experts in
    # global-id order (their dtype: this rank's experts' of that layer, the run's precision).
    layout = [
        (name, tuple(t.shape), t.dtype)
        for name, t in own.items()
        if name in expected and ".deepspeed_experts." not in name
    ]
    for layer, block in model.moe_blocks().items():
        local = block.moe.experts[0].state_dict()
        for global_id in range(len(block.gate.expert_groups) - 1):
            prefix = f"model.layers.{layer}.mlp.{NEW_EXPERT_PREFIX}.{global_id}"
            layout += [(f"{prefix}.{sub}", tuple(t.shape), t.dtype) for sub, t in local.items()]
    missing = sorted(set(expected) - {name for name, _, _ in layout})
    if missing:
        raise AssertionError(f"export: tensors missing from the trained model: {missing[:3]}")

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
        tokenizer.save_pretrained(directory)

    write_model_dir(out, config, model_cls, write)
    log.info("exported %s", out)


def _write_all(directory: Path, model, tokenizer, max_shard_bytes: int) -> None:
    from layermoe_ds.modeling.streaming import ShardWriter, saved_keys

    state = model.state_dict()
    names = list(saved_keys(model))
    writer = ShardWriter(directory, [(n, tuple(state[n].shape), state[n].dtype) for n in names], max_shard_bytes)
    for name in names:
        writer.write(name, state[name])
    writer.close()
    tokenizer.save_pretrained(directory)
