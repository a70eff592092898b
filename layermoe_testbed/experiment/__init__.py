"""`layermoe experiment`: several systems on the same data and token budget, one report.

- `presets`: what runs (systems, seeds, budgets) — `PRESETS["demo" | "full" | "paper"]`.
- `cache`: the one caching idiom (a step reruns when its inputs' fingerprint changes; training resumes).
- `runner`: profile → per system and seed: allocate → stage 1 → stage 2 → evaluate (→ lifelong expansion).
- `reading`: the paper's claims judged from the numbers (seed spread); `curve`: the budget–quality curve.
- `report`: `results.json`, `report.md` and the plots.
"""

from layermoe_testbed.experiment.presets import (
    DENSE_BASE,
    DENSE_FINETUNE,
    LAYERMOE,
    PRESETS,
    UNIFORM,
    Phase,
    Preset,
    RunId,
    System,
    SystemMethod,
)
from layermoe_testbed.experiment.report import finite_table
from layermoe_testbed.experiment.runner import run_experiment

__all__ = [
    "DENSE_BASE",
    "DENSE_FINETUNE",
    "LAYERMOE",
    "PRESETS",
    "UNIFORM",
    "SystemMethod",
    "Phase",
    "Preset",
    "RunId",
    "System",
    "finite_table",
    "run_experiment",
]
