"""One rank-0 metrics sink: TensorBoard scalars (stable tags), a JSONL record per step, plain log lines for Slurm
logs and a tqdm bar. Other ranks get a no-op logger."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("layermoe.train")


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, log_every: int):
        self.enabled = rank == 0
        self.log_every = log_every
        self.writer = None
        self.bar = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

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
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.before = self.peak = self.process.memory_info().rss
        self._stop = None

    def __enter__(self) -> RssPeak:
        import threading

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
