"""Stage 1 / stage 2 training on DeepSpeed: `StageTrainer` sets up (checks, data, process group, model, engine,
resume), runs train steps, saves checkpoints and exports the model at the end.

Every check that can fail on user input runs before the first step. A SIGTERM/SIGINT (Slurm preemption, the
DeepSpeed launcher's shutdown) finishes the current step, saves a checkpoint and exits 0; `resume: auto` picks up
the newest complete checkpoint with the same data order and RNG state, so losses continue bit-identically.
"""

from __future__ import annotations

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

from layermoe_ds.checkpoints import save_load as checkpoint
from layermoe_ds.checkpoints.format import model_slots
from layermoe_ds.config import TrainConfig, to_dict
from layermoe_ds.data.packing import BlockSampler
from layermoe_ds.data.stage_data import StageData, stage_blocks
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.distributed import RETURN_FREES_ENV, device_and_backend, return_large_frees_to_os
from layermoe_ds.ds.engine import check_ds_config, initialize, model_dtype
from layermoe_ds.ds.internals import check_version, release_optimizer
from layermoe_ds.ds.names import new_expert_index
from layermoe_ds.ds.process import init_process_group, release_shm_buffers
from layermoe_ds.errors import OutputExistsError
from layermoe_ds.io import read_json, write_json
from layermoe_ds.modeling.types import moe_blocks
from layermoe_ds.training.build import ModelSource, build_model, resolve_model
from layermoe_ds.training.export import export_model, write_model_files
from layermoe_ds.training.host_reads import HOST_READS, HostReadSections
from layermoe_ds.training.losses import LossWeights, stage_losses
from layermoe_ds.training.metrics import (
    MetricsLogger,
    RssPeak,
    accumulate,
    own_peak_memory_mib,
    reduce_scalars,
)
from layermoe_ds.training.patches import apply_training_patches

log = logging.getLogger("layermoe.train")

RESOLVED = "resolved_config.json"
CENSUS = "rank_census.json"  # per rank: the tensors and bytes it materialised, the experts it holds per layer


class StopFlag:
    """SIGTERM/SIGINT set a flag; the ranks agree on it with each step's metrics (`train_step`'s "stop": the
    largest flag of any rank)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: finishing this step, saving and exiting", signal.Signals(signum).name)
        self.requested = True


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
            raise OutputExistsError(
                f"{out} already holds a different run (its {RESOLVED} differs in: {', '.join(changed) or 'version'}); "
                "use another --out or delete it"
            )


# Settings that may change between a run and its resumption: how it resumes, logs and diagnoses, where the
# directory is, activation checkpointing (memory, not numbers: a run that ran out of memory resumes with it on), the
# process-group timeout, and the base model's path: a run's base is identified by its files' SHA-256, checked against
# the checkpoint's pointer on resume, so a moved base is found again by pointing `model` at it.
UNFINGERPRINTED = (
    "resume",
    "log_every",
    "count_host_reads",
    "out",
    "activation_checkpointing",
    "dist_timeout_minutes",
    "model",
)


def _fingerprint(train: dict, ds: dict, stage: int) -> str:
    stable = {k: v for k, v in train.items() if k not in UNFINGERPRINTED}
    text = json.dumps({"stage": stage, "train": stable, "ds": ds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(stage: int, config: TrainConfig, ds_config: dict) -> int:
    """Train `stage` (1 or 2) as configured; returns a process exit code (0: done, or stopped by a signal and saved)."""
    check_version()  # a DeepSpeed outside the tested range: one line, before anything is built
    trainer = StageTrainer(stage, config, ds_config)
    stopped = trainer.train()
    if not stopped:
        trainer.export()
    return 0


class StageTrainer:
    """One stage's run on this rank. Building it does every check that can fail on user input, then the data, the
    process group, the model, the DeepSpeed engine and the resumption from the newest complete checkpoint."""

    def __init__(self, stage: int, config: TrainConfig, ds_config: dict) -> None:
        self.process_start = psutil.Process().create_time()
        if device_and_backend()[0] == "cpu" and os.environ.get(RETURN_FREES_ENV) == "1":
            return_large_frees_to_os()  # before anything large is allocated (distributed.py says why, and its cost)
        self.stage, self.config, self.out = stage, config, Path(config.out)
        # Stage 2 hands DeepSpeed an fp32 config (ds/engine.py explains); the JSON's bf16 sets the frozen precision.
        frozen_dtype = model_dtype(ds_config)
        self.ds_config = check_ds_config(ds_config, stage)
        resolved, self.source = self._check_inputs()
        # Data before any process group: raw text is tokenized into the cache by the first rank to get there while
        # the others wait on its lock, not in a collective that could time out.
        self.tokenizer = load_tokenizer(self.source.path)
        self.blocks = stage_blocks(StageData.of(config), stage, self.tokenizer, self.source.path)
        self._build(frozen_dtype, resolved)
        self.base = checkpoint.base_pointer(self.source.path, self.source.allocation, config.seed)
        self.step = self._resume()
        self.host_reads_counted = False

    def _check_inputs(self) -> tuple[dict, ModelSource]:
        """The run directory, the checkpoints in it and the model, before anything is built; (the resolved config,
        the model it starts from)."""
        config, out = self.config, self.out
        resolved = {"stage": self.stage, "train": to_dict(config), "deepspeed": self.ds_config}
        resolved["fingerprint"] = _fingerprint(resolved["train"], self.ds_config, self.stage)
        _check_run_dir(out, resolved)
        if config.resume == "no" and checkpoint.complete_checkpoints(out):
            raise OutputExistsError(f"{out} has checkpoints and train.resume is 'no'; use another --out")
        source = resolve_model(config, self.stage)  # the model's files and settings, before anything else
        newest = checkpoint.complete_checkpoints(out)
        if newest and config.resume == "auto":  # refuse another allocation's checkpoint before anything is built
            marker = read_json(newest[-1] / checkpoint.MARKER, "checkpoint marker")
            checkpoint.check_compatible(marker, source.config, newest[-1])
        return resolved, source

    def _build(self, frozen_dtype: torch.dtype, resolved: dict) -> None:
        """The process group, this rank's model, the sampler and the DeepSpeed engine; the resolved config and every
        rank's census written to the run directory."""
        config, out = self.config, self.out
        device_name, backend = device_and_backend()
        self.rank, self.world = init_process_group(backend, device_name, config.dist_timeout_minutes)
        if backend == "gloo":  # every rank has mapped the CPU all-reduce segments by now: drop their names
            dist.barrier()
            release_shm_buffers()
        self.device = torch.device(device_name)
        torch.manual_seed(config.seed)
        built = build_model(self.source, config, self.stage, self.world, frozen_dtype, self.device)
        model = self.model = built.model
        self.loss_weights = LossWeights.of(config)
        self.ep_sizes = built.ep_sizes
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.sampler = BlockSampler(len(self.blocks), self.micro, config.seed, self.rank, self.world)
        model.to(self.device)  # the buffers (rotary frequencies, routing tables): the parameters were made there
        patched = apply_training_patches(model, config, self.stage)
        self.anchor, loss_chunk = patched.anchor, patched.loss_chunk_tokens
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tokens = self.blocks.tokens_per_lang
            extra = {"ep_sizes": self.ep_sizes, "world_size": self.world, "data_tokens": tokens}
            write_json(out / RESOLVED, {**resolved, **extra})
        self.engine, _, self.scheduler = initialize(model, built.trainable, config, self.ds_config, self.device)
        census: list = [None] * self.world  # with each rank's peak memory once set up (before the first step)
        own = {**built.census, "loss_chunk_tokens": loss_chunk, "setup_peak_mib": own_peak_memory_mib(self.device)}
        dist.all_gather_object(census, own)
        if self.rank == 0:
            write_json(out / CENSUS, {str(r): c for r, c in enumerate(census)})
        # Only replicated gate weights trained at ZeRO 0 (stage 2): optimizer state is valid on any world size, and
        # the checkpoint holds them alone.
        self.gates_only = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and not any(
            new_expert_index(name) is not None for name, p in model.named_parameters() if p.requires_grad
        )

    def _resume(self) -> int:
        """The step to start from: the newest complete checkpoint's (engine, scheduler and sampler restored), or 0."""
        if self.config.resume != "auto":
            return 0
        base = (self.source.path, self.base["files"])
        marker = checkpoint.load_latest(self.engine, self.out, self.model, self.scheduler, self.gates_only, base)
        if marker is None:
            return 0
        self.sampler.load_state_dict(marker["sampler"])
        return marker["step"]

    def train(self) -> bool:
        """Steps until `config.steps`, saving every `save_every`; True when a signal stopped it first (saved)."""
        stop = StopFlag()
        metrics = MetricsLogger(self.out, self.rank, self.config.steps, self.step, self.config.log_every)
        try:
            while self.step < self.config.steps:
                scalars = self.train_step(stop.requested)
                stopping = bool(scalars.pop("stop"))
                metrics.step(self.step + 1, scalars)
                self.step += 1
                self.maybe_save(stopping)
                if stopping and self.step < self.config.steps:
                    log.warning("stopped at step %d after a signal; rerun the same command to resume", self.step)
                    return True
        finally:
            metrics.close()
        return False

    def train_step(self, stop_requested: bool = False) -> dict[str, float]:
        """One optimizer step over the gradient-accumulation micro-batches; the step's scalars, reduced over ranks,
        with "stop": whether any rank was asked to stop. The metrics stay on the device until one read at the end."""
        config, engine, device = self.config, self.engine, self.device
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # what this step's update uses: the last engine.step() advances it
        accumulation = engine.gradient_accumulation_steps()
        sums: dict = {}
        counting = HostReadSections(config.count_host_reads and not self.host_reads_counted)
        for micro in range(accumulation):
            ids, labels = self.blocks.batch(self.sampler.next_indices())  # host data: no device read
            with counting("micro_step", micro == 0):
                self.forward_backward(ids, labels, sums, accumulation)
            with counting("optimizer_step", micro == accumulation - 1):
                engine.step()
        maxima = {"memory/peak_mib": own_peak_memory_mib(device), "stop": float(stop_requested)}
        grad_norm = engine.get_global_grad_norm()  # the same on every rank; a device tensor under ZeRO
        if grad_norm is not None:
            maxima["grad_norm"] = grad_norm
        with counting("metrics"):
            scalars = reduce_scalars(sums, device, maxima)
        if counting.enabled:
            self.host_reads_counted = True
            counting.write(self.out / HOST_READS, len(moe_blocks(self.model)), self.step + 1)
        scalars["lr"] = lr
        tokens = self.world * accumulation * self.micro * config.seq_len
        scalars["tokens_per_s"] = tokens / (time.perf_counter() - started)
        scalars["time/since_start_s"] = time.time() - self.process_start  # start-up cost shows in the first step
        return scalars

    def forward_backward(self, ids: torch.Tensor, labels: torch.Tensor, sums: dict, accumulation: int) -> None:
        """One micro-batch (`ids` [B, L], `labels` [B] the language group of each row): forward, stage losses,
        backward; its metrics added to `sums` (on the device)."""
        ids = ids.to(self.device)
        groups = labels[:, None].expand_as(ids).to(self.device)
        # No KV cache in training; and this step's outputs are dropped before the next forward, not kept alive
        # through it.
        output = self.engine(input_ids=ids, labels=ids, use_cache=False)
        losses = stage_losses(self.model, output.loss, groups, self.stage, self.loss_weights, self.anchor)
        self.engine.backward(losses.total)
        accumulate(sums, self.model, losses, groups, accumulation)
        del output, losses

    def maybe_save(self, stopping: bool) -> None:
        """A checkpoint every `save_every` steps, at the last step, and when a signal asks to stop."""
        step = self.step
        if not (step % self.config.save_every == 0 or step == self.config.steps or stopping):
            return
        checkpoint.save(
            self.engine,
            self.out,
            step,
            {
                "stage": self.stage,
                "sampler": self.sampler.state_dict(),
                "layout": checkpoint.expert_layout_of(self.model),
                "ep_sizes": self.ep_sizes,
                "expert_slots": model_slots(self.model),
                "gates_only": self.gates_only,
                "base": self.base,
            },
            self.config.keep_last_n,
            model_files=lambda directory: write_model_files(self.model, self.tokenizer, directory, self.stage),
        )

    def export(self) -> None:
        """The trained model as OUT/model (every rank takes part), once the optimizer's state is freed; rank 0
        records what the export took in OUT/export.json (host memory: the gathered experts)."""
        released = release_optimizer(self.engine)
        log.info("optimizer state freed before the export: %.1f MiB on this rank", released / 2**20)
        started = time.perf_counter()
        try:
            with RssPeak() as rss:
                export_model(self.model, self.tokenizer, self.out / "model", self.stage)
        except OSError as exc:  # the final checkpoint is complete: a rerun resumes at the last step and exports
            raise checkpoint.write_failed(f"the model export {self.out / 'model'}", exc, self.out) from exc
        if self.rank == 0:
            write_json(
                self.out / "export.json",
                {
                    "seconds": round(time.perf_counter() - started, 3),
                    "rss_before_mib": round(rss.before / 2**20, 1),
                    "peak_rss_mib": round(rss.peak / 2**20, 1),
                },
            )
