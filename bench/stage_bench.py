"""Stage-2 vs stage-1 step time, optimizer-state bytes per rank at world 1 vs 2 (ZeRO-1), and what dropless
routing (the default) costs a stage-1 step against capacity-capped routing (`drop_tokens: true`), through the real
launchers in one invocation.

Goals (issue 6): a stage-2 step ≤ 0.6× a stage-1 step on the same model and batch; ZeRO-1 optimizer state per rank
at world 2 ≈ 0.5× world 1. Issue 18: report the dropless/dropping step-time ratio and the routes dropped.

    DS_ACCELERATOR=cpu python bench/stage_bench.py            # demo artifacts: artifacts/base, runs/demo, data
    DS_ACCELERATOR=cpu python bench/stage_bench.py --random-shape 512,1408,8 --experts 4 --steps 12 \
        --out bench/results/stage_bench_h512.json               # a random FFN-dominated model, uniform experts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import (  # noqa: E402
    add_launch_flags,
    add_model_flags,
    dropped_routes,
    launch,
    optimizer_bytes_per_rank,
    step_seconds,
    use_random_shape,
    write_result,
)

from layermoe_ds.config import parse_groups  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, experts=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    add_launch_flags(parser, 29_611)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage_bench.json")
    args = parser.parse_args(argv)
    groups = parse_groups(args.language_groups)
    skip = min(5, args.steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        use_random_shape(args, tmp)
        common = {
            "data": str(Path(args.data).resolve()),
            "language_groups": groups,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "lr": 1e-3,
            "save_every": args.steps,
            "log_every": args.steps,
            "stage2_docs_per_old_lang": 100_000,
            "stage2_docs_per_new_lang": 100_000,
        }
        stage1 = {
            **common,
            "model": str(Path(args.model).resolve()),
            "allocation": str(Path(args.allocation).resolve()),
        }
        s1_w2 = launch(
            1, 2, {**stage1, "out": str(tmp / "s1_w2")}, "stage1_zero1.json", tmp, args.port, launcher=args.launcher
        )
        s1_w2_drop = launch(
            1,
            2,
            {**stage1, "drop_tokens": True, "out": str(tmp / "s1_w2_drop")},
            "stage1_zero1.json",
            tmp,
            args.port + 3,
            launcher=args.launcher,
        )
        s1_w1 = launch(
            1, 1, {**stage1, "out": str(tmp / "s1_w1")}, "stage1_zero1.json", tmp, args.port + 1, launcher=args.launcher
        )
        s2_w2 = launch(
            2,
            2,
            {**common, "model": str(s1_w2 / "model"), "out": str(tmp / "s2_w2")},
            "stage2.json",
            tmp,
            args.port + 2,
            launcher=args.launcher,
        )
        result = {
            "stage1_step_s": step_seconds(s1_w2, skip),
            "stage2_step_s": step_seconds(s2_w2, skip),
            "stage1_dropping_step_s": step_seconds(s1_w2_drop, skip),
            "stage1_routes_dropped": dropped_routes(s1_w2),
            "stage1_dropping_routes_dropped": dropped_routes(s1_w2_drop),
            "optimizer_bytes_per_rank_world1": optimizer_bytes_per_rank(s1_w1),
            "optimizer_bytes_per_rank_world2": optimizer_bytes_per_rank(s1_w2),
            "stage2_optimizer_bytes_per_rank": optimizer_bytes_per_rank(s2_w2),
        }
    result["stage2_over_stage1_step"] = result["stage2_step_s"] / result["stage1_step_s"]
    result["dropless_over_dropping_stage1_step"] = result["stage1_step_s"] / result["stage1_dropping_step_s"]
    result["zero1_world2_over_world1_optimizer_bytes"] = (
        result["optimizer_bytes_per_rank_world2"] / result["optimizer_bytes_per_rank_world1"]
    )
    result.update(steps=args.steps, seq_len=args.seq_len, model=args.random_shape or args.model)
    result["allocation"] = f"{args.experts} per layer" if args.random_shape else args.allocation
    print(
        f"stage-1 step {result['stage1_step_s'] * 1e3:.1f} ms, stage-2 step {result['stage2_step_s'] * 1e3:.1f} ms"
        f" (2 ranks): stage 2 / stage 1 = {result['stage2_over_stage1_step']:.2f}x (goal <= 0.6)"
    )
    print(
        f"ZeRO-1 optimizer state per rank: world 1 {result['optimizer_bytes_per_rank_world1'] / 1e6:.2f} MB, "
        f"world 2 {result['optimizer_bytes_per_rank_world2'] / 1e6:.2f} MB: "
        f"{result['zero1_world2_over_world1_optimizer_bytes']:.2f}x (goal ~0.5); stage 2: "
        f"{result['stage2_optimizer_bytes_per_rank'] / 1e6:.3f} MB per rank"
    )
    print(
        f"dropless stage-1 step / capacity-capped (capacity_factor 1.25, drop_tokens: true) = "
        f"{result['dropless_over_dropping_stage1_step']:.2f}x; routes dropped over the run: "
        f"{result['stage1_routes_dropped']:.0f} dropless, {result['stage1_dropping_routes_dropped']:.0f} capped"
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
