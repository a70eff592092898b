"""A stage-1 step in bf16 against fp32 on CPU ranks, side by side in one invocation: the same model, allocation,
data, seed and steps through the real launcher, once with DeepSpeed's bf16 on and once without (the CPU default).
Printed: median seconds per step after warm-up and their ratio (bf16 ÷ fp32: below 1 means bf16 is faster), and how
far bf16's losses are from fp32's (the largest step-wise difference of the next-token loss, and of the mean over the
last third of the steps). The real presets would use bf16 only if it is faster and its losses track fp32's.

    DS_ACCELERATOR=cpu python bench/precision_bench.py --model artifacts/smollm2 --data artifacts/smollm2-tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import add_launch_flags, launch, step_seconds, write_result  # noqa: E402

from layermoe_ds.config import parse_groups  # noqa: E402


def cpu_flags() -> list[str]:
    """The CPU's bf16-relevant instruction sets (avx512_bf16, amx_bf16), from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({f for f in flags.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx")})


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss/ntp"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="artifacts/smollm2", help="the dense base (upcycled on the fly)")
    parser.add_argument("--data", default="artifacts/smollm2-tokens")
    parser.add_argument("--language-groups", default="en;fr,ru,el")
    parser.add_argument(
        "--experts", default=None, help="experts per layer, comma-separated (default: 3 in the first 10 layers)"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    add_launch_flags(parser, 29_811)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_bench.json")
    args = parser.parse_args(argv)
    layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    experts = [int(n) for n in args.experts.split(",")] if args.experts else [3] * min(10, layers) + [1] * (layers - 10)
    if len(experts) != layers:
        parser.error(f"--experts: {len(experts)} counts for a model of {layers} layers ({args.model})")
    skip = max(1, args.steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "allocation.json").write_text(json.dumps({"experts_per_layer": experts, "classifier_layers": []}))
        (tmp / "bf16.json").write_text(json.dumps({"bf16": {"enabled": True}}))
        common = {
            "model": str(Path(args.model).resolve()),
            "allocation": str(tmp / "allocation.json"),
            "data": str(Path(args.data).resolve()),
            "language_groups": parse_groups(args.language_groups),
            "steps": args.steps,
            "seq_len": args.seq_len,
            "lr": 2e-4,
            "warmup_steps": 2,
            "save_every": args.steps,
            "log_every": 1,
            "seed": 0,
        }
        runs = {}
        for i, (name, extra) in enumerate((("fp32", []), ("bf16", [tmp / "bf16.json"]))):
            out = launch(1, args.ranks, {**common, "out": str(tmp / name)}, "stage1_zero2.json", tmp, args.port + i,
                         extra_json=extra, launcher=args.launcher)  # fmt: skip
            runs[name] = {"step_s": step_seconds(out, skip), "losses": losses(out)}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    tail = slice(-max(1, args.steps // 3), None)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_bf16_flags": cpu_flags(),
        "model": str(args.model),
        "experts_per_layer": experts,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "ranks": args.ranks,
        "runs": runs,
        "bf16_over_fp32_step": bf16["step_s"] / fp32["step_s"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)),
        "tail_mean_loss": {
            "fp32": statistics.mean(fp32["losses"][tail]),
            "bf16": statistics.mean(bf16["losses"][tail]),
        },
    }
    print(f"CPU bf16 instructions: {', '.join(result['cpu_bf16_flags']) or 'none'}")
    print(f"{'':<6} {'s/step':>8} {'last-third mean loss':>22}")
    for name in ("fp32", "bf16"):
        print(f"{name:<6} {runs[name]['step_s']:>8.2f} {result['tail_mean_loss'][name]:>22.4f}")
    print(f"bf16 ÷ fp32 step time: {result['bf16_over_fp32_step']:.2f}; largest step-wise loss difference "
          f"{result['max_loss_diff']:.4f}")  # fmt: skip
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
