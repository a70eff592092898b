"""What a training step reports: each rank's sums of losses, expert loads, routing hits and capacity padding
(`accumulate`, on the device), reduced over ranks into the logged scalars with one host read a step
(`reduce_scalars`); peak memory; and one rank-0 sink for them (`MetricsLogger`:
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
            keys = (
                "loss/total",
                "loss/ntp",
                "loss/balance",
                "loss/lpr",
                "loss/cls",
                "loss/anchor",
                "lr",
                "tokens_per_s",
            )
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


Number = float | int | torch.Tensor


def _add(sums: dict[str, Number], key: str, value: Number) -> None:
    value = value.detach() if isinstance(value, torch.Tensor) else value
    sums[key] = sums[key] + value if key in sums else value


def accumulate(sums: dict[str, Number], model, losses, groups: torch.Tensor, accumulation: int) -> None:
    """Per-step sums of what gets logged, kept where they are (device tensors stay on the device: nothing here reads
    one on the host); losses and capacity ratios divided by the accumulation steps. `reduce_scalars` reads them."""
    for name in ("total", "ntp", "balance", "lpr", "cls", "anchor"):
        _add(sums, f"loss/{name}", getattr(losses, name) / accumulation)
    _add(sums, "classifier/correct", losses.cls_correct)
    _add(sums, "classifier/count", losses.cls_count)
    old_tokens = groups.reshape(-1) == 0
    for layer, block in moe_blocks(model).items():
        aux = block.aux
        _add(sums, "moe/dropped", aux.dropped)
        _add(sums, f"moe/layer_{layer:02d}/expert_load", aux.expert_load_E)
        ratio = getattr(block.moe, "capacity_over_mean_load", None)  # the expert-parallel path's buffer padding
        if ratio is not None:
            _add(sums, f"moe/layer_{layer:02d}/capacity_over_mean_load", ratio / accumulation)
        # Share of old-language tokens whose top route is expert 0 (what stage 2 should raise).
        top = aux.router_log_probs_TE.argmax(dim=-1)
        key = f"routing/layer_{layer:02d}/old_to_expert0"
        _add(sums, key + "/hits", ((top == 0) & old_tokens).sum())
        _add(sums, key + "/count", old_tokens.sum())


def own_peak_memory_mib(device: torch.device) -> float:
    """This rank's peak memory so far, in MiB: allocated GPU memory (torch.cuda.max_memory_allocated), or on CPU the
    process's peak resident set (everything: libraries, model, optimizer, activations)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _flat(values: list[Number], device) -> torch.Tensor:
    parts = [
        v.detach().reshape(-1).to(device, torch.float64)
        if isinstance(v, torch.Tensor)
        else torch.tensor([float(v)], dtype=torch.float64, device=device)
        for v in values
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def reduce_scalars(sums: dict[str, Number], device, maxima: dict[str, Number] | None = None) -> dict[str, float]:
    """The step's scalars: losses and capacity ratios averaged over ranks, counts added up, hit/count pairs turned
    into shares, each `maxima` value the largest of any rank's. Two all-reduces and one host read for them all."""
    maxima = maxima or {}
    sum_keys, max_keys = sorted(sums), sorted(maxima)
    summed, largest = _flat([sums[k] for k in sum_keys], device), _flat([maxima[k] for k in max_keys], device)
    dist.all_reduce(summed)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    values = torch.cat([summed, largest]).tolist()
    totals, position = {}, 0
    for key in sum_keys:
        width = sums[key].numel() if isinstance(sums[key], torch.Tensor) else 1
        chunk, position = values[position : position + width], position + width
        totals[key] = chunk if key.endswith("/expert_load") else chunk[0]
    world = dist.get_world_size()
    scalars = {k: v / world for k, v in totals.items() if k.startswith("loss/") or k.endswith("_over_mean_load")}
    scalars["moe/dropped"] = totals.get("moe/dropped", 0.0)
    for key, value in totals.items():
        if key.endswith("/expert_load"):
            scalars.update({f"{key}/{e:02d}": load for e, load in enumerate(value)})
        elif key.endswith("/hits"):
            count = totals[key[: -len("/hits")] + "/count"]
            if count:
                scalars[key[: -len("/hits")]] = value / count
    if totals.get("classifier/count"):
        scalars["classifier/accuracy"] = totals["classifier/correct"] / totals["classifier/count"]
    scalars.update(zip(max_keys, values[len(summed) :], strict=True))
    return scalars
