"""The learning-rate schedule of every training loop here (pretraining and both stages)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """The multiplier of the peak learning rate at `step` (0-based): linear warm-up over `warmup_steps`, then cosine
    decay to `min_ratio` at `total_steps` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
