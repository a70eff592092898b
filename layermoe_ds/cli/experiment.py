"""`layermoe experiment` and `layermoe demo` (the `demo` preset)."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
from pathlib import Path

from layermoe_ds.cli.common import DEFAULT_CACHE


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the `demo` experiment preset on the embedded corpus, on CPU (cached steps)")
    _experiment_arguments(p, default_out=Path("runs/demo"))
    p.set_defaults(func=_cmd_demo, preset="demo", report_only=False)


def add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="several systems (baselines, LayerMoE, ablations) on the same data and budget, one report",
        description="Profile once, then per system allocate → stage 1 → stage 2 (deepspeed, 2 CPU ranks) → evaluate; "
        "every finished step is cached so a rerun resumes; OUT/report.md, results.json and plots are rewritten after "
        "every finished run (a stopped experiment has the report of what finished). Without "
        "--base the embedded corpus, tokenizer and tiny base model are built (or reused) first.",
    )
    presets = ("demo", "full", "paper", "stage2-study", "stage2-narrow", "real-premise", "real")
    p.add_argument("--preset", choices=presets, default="demo", help="demo: dense, "
                   "uniform, LayerMoE; full: + dense full fine-tune, random allocation, no classifier, last-K "
                   "classifiers, seeds 0-2 of uniform and LayerMoE, lifelong G0->G1->G2 (es,it) of both; paper: on "
                   "the calibrated 12-layer base (deep-narrow), the budget-quality curve of uniform, LayerMoE and "
                   "random at ~12/24/36/60 new experts, the headline with a bootstrap interval, the ablations and "
                   "lifelong rows over 3 seeds; stage2-study: on the deep base, uniform and LayerMoE at 24 new "
                   "experts over 3 seeds, stage 2 as the paper runs it and variants of it from the same stage-1 "
                   "models; stage2-narrow: the paper preset's uniform and LayerMoE at ~24 new experts, stage 2 "
                   "again at router anchor 0.1 and 1; real-premise: on the real base (SmolLM2-135M, `real-base`), "
                   "20 new experts in the 10 least vs the 10 most similar layers, seeds 0-1; real: its budget-quality "
                   "curve (uniform at 30/60/90 new, LayerMoE and random at 24/45/60), the dense full fine-tune, "
                   "English also read on the Python docs (data off-domain)")  # fmt: skip
    _experiment_arguments(p, default_out=None)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: write OUT's report of the runs that have finished, with this code (e.g. "
        "beside the same experiment still running)",
    )
    p.set_defaults(func=_cmd_demo)


def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="the testbed grid (base FFN width, its share of the later languages, stage-1 steps) where more experts "
        "buy measurable quality",
        description="At each grid point, uniform MoE-LPR at the smallest and the largest budget over 2 seeds, both "
        "stages; writes OUT/calibration.md and .json with the cheapest point where the largest budget's New-avg beats "
        "the smallest's by 3 pooled seed sds. Each point is an experiment under OUT/<point>/, cached and resumable; "
        "the base models are pretrained once into --artifacts. Exits 1 when no point qualifies.",
    )
    p.add_argument("--grid", choices=("testbed", "real"), default="testbed", help="testbed: the testbed bases' "
                   "grid (FFN width, later-language share, stage-1 steps), uniform 1 vs 5 new experts a layer; real: "
                   "the real base (SmolLM2-135M, `real-base`) with the real-premise preset's settings, uniform 1 vs 3 "
                   "new a layer at 60 stage-1 steps, then 180 if 60 does not qualify")  # fmt: skip
    _experiment_arguments(p, default_out=Path("runs/calibration"), base=False)
    p.set_defaults(func=_cmd_calibrate)


def _experiment_arguments(p, default_out: Path | None, base: bool = True) -> None:
    p.add_argument(
        "--out", "--runs", dest="runs", metavar="DIR", type=Path, default=default_out, required=default_out is None
    )
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    if base:
        p.add_argument("--base", type=Path, default=None, help="a dense base model directory (default: build the "
                       "tiny one)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun"),
        default="deepspeed",
        help="how each stage starts its ranks on this node: DeepSpeed's launcher (default), or torchrun "
        "--standalone, 4-9 s less start-up per stage on a 2-core box (the same numbers)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished stage's checkpoints (by "
                   "default they are removed once the stage has exported its model: they only serve to resume it, "
                   "and take 3-9 GB a run on a 135M-parameter base)")  # fmt: skip


def _cmd_demo(args) -> int:
    from layermoe_testbed.demo import run_demo

    return run_demo(
        args.data, args.artifacts, args.runs, args.cache, args.preset, args.base, args.launcher, args.keep_checkpoints,
        args.report_only,
    )  # fmt: skip


def _cmd_calibrate(args) -> int:
    from layermoe_testbed.calibration import GRIDS, run_calibration

    grid = GRIDS[args.grid]
    report = run_calibration(
        grid, args.data, args.artifacts, args.cache, args.runs, args.launcher, keep_checkpoints=args.keep_checkpoints
    )
    print(
        "\n".join(
            line for line in (args.runs / "calibration.md").read_text().splitlines() if line.startswith(("|", "**"))
        )
    )
    return 0 if report["choice"] else 1
