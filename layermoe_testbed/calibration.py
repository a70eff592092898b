"""`layermoe calibrate`: which testbed makes the number of new experts measurable.

The paper's headline ("LayerMoE reaches uniform MoE-LPR's quality with fewer new experts") can only be read off a
budget–quality curve that has a slope: more experts must buy more New-avg than the seeds scatter. Each grid point is
a base model (a `pretrain` preset: its FFN width, i.e. each expert's size, and how much of the later languages it
has seen) and a number of stage-1 steps; at each, uniform MoE-LPR runs at the smallest and the largest budget over
the same seeds, both stages, with every other setting the paper preset's. The chosen point is the cheapest where the
largest budget's final New-avg beats the smallest's by at least `ratio` pooled seed sds; cheapest in training compute
(stage-1 steps × the base's parameters), as wall time on a shared 2-core machine is too noisy to rank points by.
Every run goes through the experiment cache: a rerun skips what is done, a killed one resumes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from layermoe_ds.data.streams import open_streams
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.ds.process import SHIPPED_CONFIGS, Launcher
from layermoe_ds.errors import InputError
from layermoe_ds.io import atomic_write_text, read_json, write_json
from layermoe_testbed.demo import prepare_base
from layermoe_testbed.experiment import DENSE_BASE, Preset, RunId, System, SystemMethod, run_experiment
from layermoe_testbed.experiment.presets import PAPER, REAL
from layermoe_testbed.experiment.reading import average, pooled_sd, runs_of, stats
from layermoe_testbed.experiment.runner import slug
from layermoe_testbed.pretrain import PRESETS as BASE_PRESETS
from layermoe_testbed.real_base import REAL_BASE


@dataclass(frozen=True)
class GridPoint:
    base: str  # a `pretrain` preset (testbed/pretrain.py)
    stage1_steps: int

    @property
    def name(self) -> str:
        return f"{self.base} base, {self.stage1_steps} stage-1 steps"


@dataclass(frozen=True)
class Calibration:
    points: tuple[GridPoint, ...]
    budgets: tuple[int, int] = (2, 6)  # uniform experts per layer (expert 0 included): the smallest and the largest
    seeds: tuple[int, ...] = (0, 1)
    max_epochs: float = 1.0  # no language's training text read more often than this in stage 1
    ratio: float = 3.0  # the largest budget must beat the smallest by this many pooled seed sds
    settings: Preset = PAPER  # everything but the systems, the base and the stage-1 steps
    settings_name: str = "paper"  # the preset those settings are, as the report names it
    # Stop at the first point that qualifies (the points are then in order of cost): each later one costs more.
    stop_when_met: bool = False

    def __post_init__(self) -> None:
        unknown = sorted({p.base for p in self.points} - {*BASE_PRESETS, REAL_BASE})
        if unknown:
            raise InputError(f"calibration: unknown base presets {unknown}; known: {sorted(BASE_PRESETS)}")
        if not self.points:
            raise InputError("calibration: no grid points")
        if len(self.seeds) < 2:
            raise InputError("calibration: a seed sd needs at least 2 seeds")
        if not 1 < self.budgets[0] < self.budgets[1]:
            raise InputError(f"calibration: budgets {self.budgets} must be two increasing counts above 1")


# One factor at a time from the paper preset's point (the `deep` base, 150 stage-1 steps): each expert a third of
# the size (FFN 128 instead of 352), a base that has seen a quarter as much of the later languages (2% instead of
# 8%), three times the stage-1 tokens.
GRID = Calibration(
    points=(
        GridPoint("deep", 150),
        GridPoint("deep-narrow", 150),
        GridPoint("deep-rare", 150),
        GridPoint("deep", 450),
    )
)


# The real base (`layermoe real-base`, SmolLM2-135M-Instruct) with the REAL preset's data, learning rates and
# stage 2: uniform MoE-LPR at 1 and at 3 new experts a layer, at the premise test's 60 stage-1 steps, then three
# times that; the second runs only if the first does not qualify.
REAL_GRID = Calibration(
    points=(GridPoint(REAL_BASE, 60), GridPoint(REAL_BASE, 180)),
    budgets=(2, 4),
    settings=REAL,
    settings_name="real-premise",
    stop_when_met=True,
)
GRIDS = {"testbed": GRID, "real": REAL_GRID}


def point_preset(calibration: Calibration, point: GridPoint) -> Preset:
    """Uniform MoE-LPR at the smallest and the largest budget, over the calibration's seeds, at `point`."""
    systems = tuple(
        System(f"MoE-LPR uniform ({n}/layer)", SystemMethod.UNIFORM, n, "0", n, n, seeds=calibration.seeds)
        for n in calibration.budgets
    )
    low, high = (s.name for s in systems)
    return replace(calibration.settings, systems=systems, base=point.base, stage1_steps=point.stage1_steps,
                   lifelong=(), reference=high, baseline=low)  # fmt: skip


def stage1_epochs(preset: Preset, data: Path, tokenizer_dir: Path) -> float:
    """How many times stage 1 reads the new languages' training text: it draws its blocks without replacement from
    all of them at once, so every language is read the same number of times."""
    streams = open_streams(data, load_tokenizer(tokenizer_dir), tokenizer_dir, preset.new, "train")
    blocks = sum(stream.num_tokens // preset.seq_len for stream in streams.values())
    engine = read_json(SHIPPED_CONFIGS / "stage1_zero2.json", "DeepSpeed config")
    per_step = engine["train_micro_batch_size_per_gpu"] * engine.get("gradient_accumulation_steps", 1) * preset.ranks
    return preset.stage1_steps * per_step / blocks


def _stats(values: list[float]) -> dict:
    return {**stats(values).as_dict(), "values": values}


def point_summary(results: dict, preset: Preset, ratio: float) -> dict:
    """The smallest and the largest budget's New-avg over seeds after each stage, the gap, the pooled seed sd, and
    their ratio; the mean training wall time per run (the point's cost)."""
    low, high = (runs_of(results, s.name) for s in preset.systems)
    summary: dict = {"wall_s_per_run": statistics.mean(r["wall_s"] for r in low + high)}
    for key, label in (("eval_stage1", "stage1"), ("eval", "final")):
        a, b = ([average(r[key], "new") for r in runs] for runs in (low, high))
        pooled = pooled_sd([stats(a), stats(b)])
        gap = statistics.mean(a) - statistics.mean(b)
        summary[label] = {"smallest": _stats(a), "largest": _stats(b), "gap": gap, "pooled_sd": pooled,
                          "gap_over_sd": gap / pooled if pooled > 0 else math.inf}  # fmt: skip
    summary["old_final"] = [_stats([average(r["eval"], "old") for r in runs]) for runs in (low, high)]
    summary["meets"] = summary["final"]["gap_over_sd"] >= ratio
    return summary


def choose(rows: list[dict]) -> dict | None:
    """The cheapest point (in stage-1 steps × base parameters, then wall time) that meets the criterion, or None."""
    meeting = [row for row in rows if row["meets"]]
    return min(meeting, key=lambda row: (row["stage1_steps"] * row["base_params"], row["wall_s_per_run"]), default=None)


def run_calibration(
    calibration: Calibration,
    data: Path,
    artifacts: Path,
    cache: Path,
    out: Path,
    launcher: Launcher,
    keep_checkpoints: bool = False,
) -> dict:
    """Build (or reuse) each point's base, check every point's stage-1 epochs before training anything, run (or
    resume) each point's experiment under `out/<point>/`, and write `out/calibration.json` and `.md`."""
    out.mkdir(parents=True, exist_ok=True)
    bases = {
        name: prepare_base(data, artifacts, cache, name) for name in dict.fromkeys(p.base for p in calibration.points)
    }
    presets = {point: point_preset(calibration, point) for point in calibration.points}
    tokenizers = {name: base if (base / "tokenizer.json").is_file() else artifacts / "tokenizer"
                  for name, base in bases.items()}  # fmt: skip
    epochs = {point: stage1_epochs(presets[point], data, tokenizers[point.base]) for point in calibration.points}
    over = [f"{point.name}: {e:.2f}" for point, e in epochs.items() if e > calibration.max_epochs]
    if over:
        raise InputError(f"calibration: stage 1 would read the new languages' text more than {calibration.max_epochs} "
                         f"times ({'; '.join(over)}); build the corpus with more pages or lower the steps")  # fmt: skip
    rows: list[dict] = []
    for point in calibration.points:
        print(f"calibration point: {point.name}", flush=True)
        preset = presets[point]
        results = run_experiment(
            preset,
            bases[point.base],
            data,
            out / slug(point.name),
            launcher=launcher,
            keep_checkpoints=keep_checkpoints,
        )
        pretrained = BASE_PRESETS.get(point.base)  # None: a pretrained base (its later-language share unknown)
        rows.append({
            "point": point.name, "base": point.base, "stage1_steps": point.stage1_steps,
            "ffn": read_json(bases[point.base] / "config.json", "base config")["intermediate_size"],
            "later_share": pretrained.low_resource_share if pretrained else None,
            "stage1_epochs": epochs[point], "base_params": results[RunId(DENSE_BASE)]["eval"]["params_total"],
            "base_sha256": results[RunId(DENSE_BASE)]["base_sha256"]["model.safetensors"],  # the experiment's
            **point_summary(results, preset, calibration.ratio),
        })  # fmt: skip
        report = _write_report(calibration, rows, out)  # after every point: a long grid shows its progress
        if calibration.stop_when_met and report["choice"]:
            break
    return report


def _write_report(calibration: Calibration, rows: list[dict], out: Path) -> dict:
    chosen = choose(rows)
    report = {
        "budgets": calibration.budgets, "seeds": calibration.seeds, "ratio": calibration.ratio,
        "settings": calibration.settings_name,
        "max_epochs": calibration.max_epochs, "points": rows, "choice": chosen["point"] if chosen else None,
        "not_run": [p.name for p in calibration.points[len(rows):]],
    }  # fmt: skip
    write_json(out / "calibration.json", report)
    atomic_write_text(out / "calibration.md", "\n".join(calibration_lines(report)) + "\n")
    return report


def calibration_lines(report: dict) -> list[str]:
    low, high = report["budgets"]
    settings = report.get("settings", "paper")  # reports written before the field: the testbed grid's
    lines = [
        "# Calibration: where more experts buy measurable quality",
        "",
        f"Uniform MoE-LPR at {low} and {high} experts per layer (expert 0 included), seeds "
        f"{', '.join(map(str, report['seeds']))}, both stages, every other setting the {settings} preset's. New-avg in "
        f"bits per byte on the test split (lower is better); gap = smallest budget − largest; sd = the pooled seed sd. "
        f"A point qualifies when the final gap is at least {report['ratio']:g} sds; the cheapest in training compute "
        f"(stage-1 steps × base parameters) is chosen. Stage 1 reads at most {report['max_epochs']:g} epoch(s) of "
        "each language's text (the epochs column).",
        "",
        f"| point | FFN | base params | later-language share | stage-1 epochs | New-avg {low}/layer | "
        f"New-avg {high}/layer | gap | sd | gap/sd | gap/sd after stage 1 | Old-avg (both) | s per run | qualifies |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["points"]:
        final, first = row["final"], row["stage1"]
        old = " / ".join(f"{s['mean']:.3f}" for s in row["old_final"])
        lines.append(
            f"| {row['point']} | {row['ffn']} | {row['base_params'] / 1e6:.2f}M | {_share(row['later_share'])} | "
            f"{row['stage1_epochs']:.3f} | "
            f"{final['smallest']['mean']:.3f} ± {final['smallest']['sd']:.3f} | "
            f"{final['largest']['mean']:.3f} ± {final['largest']['sd']:.3f} | {final['gap']:+.3f} | "
            f"{final['pooled_sd']:.4f} | {final['gap_over_sd']:.1f} | {first['gap_over_sd']:.1f} | {old} | "
            f"{row['wall_s_per_run']:.0f} | {'yes' if row['meets'] else 'no'} |"
        )
    lines.append("")
    not_run = ", ".join(report.get("not_run", ()))
    if not_run:
        why = "an earlier, cheaper point qualified" if report["choice"] else "still to run"
        lines += [f"Not run ({why}): {not_run}.", ""]
    if report["choice"]:
        lines.append(f"**Chosen: {report['choice']}** — the cheapest point that qualifies.")
    elif not_run:
        lines.append("**No point run so far qualifies.**")
    else:
        lines.append("**No point qualifies**: on none of these testbeds do more experts buy quality beyond the seeds.")
    return lines


def _share(later_share: float | None) -> str:
    return "pretrained" if later_share is None else f"{later_share:.0%}"
