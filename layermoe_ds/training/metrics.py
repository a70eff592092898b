"""What a training step reports: each rank's sums of losses, expert loads and routing hits (`accumulate`), reduced
over ranks into the logged scalars (`reduce_scalars`); peak memory; and one rank-0 sink for them (`MetricsLogger`:
TensorBoard scalars under stable tags, a JSONL record per step, plain log lines for Slurm logs and a tqdm bar; other
ranks get a no-op logger)."""

from __future__ import annotations

import json
import logging
import resource
import threading
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from layermoe_ds.modeling.types import moe_blocks

log = logging.getLogger("layermoe.train")


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, log_every: int):
        self.enabled = rank == 0
        self.log_every = log_every
        self.writer = None
        self.bar = None
        if self.enabled:
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=None)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{scalars['loss/total']:.3f}")
        if step % self.log_every == 0:
            keys = ("loss/total", "loss/ntp", "loss/balance", "loss/lpr", "loss/cls", "lr", "tokens_per_s")
            log.info("step %d %s", step, " ".join(f"{k}={scalars[k]:.4g}" for k in keys if k in scalars))

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


class RssPeak:
    """The process's peak resident set while a block runs (sampled every `interval` s in a thread): what one phase
    adds, which `ru_maxrss` (the lifetime peak) cannot tell apart from the phases before it."""

    def __init__(self, interval: float = 0.02):
        self.process, self.interval = psutil.Process(), interval
        self.before = self.peak = self.process.memory_info().rss
        self._stop = None

    def __enter__(self) -> RssPeak:
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def accumulate(sums: dict[str, float], model, losses, groups: torch.Tensor, accumulation: int) -> None:
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mib(device: torch.device) -> float:
    """The largest peak memory of any rank so far, in MiB (`own_peak_memory_mib`, max over ranks)."""
    value = torch.tensor([own_peak_memory_mib(device)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def reduce_scalars(sums: dict[str, float], device) -> dict[str, float]:
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
