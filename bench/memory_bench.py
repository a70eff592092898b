"""Stage-1 memory per rank on 2 ranks: no ZeRO vs ZeRO-1 vs ZeRO-2, and ZeRO-2 with activation checkpointing.

A randomly initialised dense Llama of the given shape (the tokenizer comes from `--tokenizer-from`) is upcycled
with `--experts` experts per layer and trained for a few stage-1 steps through the real launcher per variant, all in
one invocation. Per variant: the largest peak memory of any rank (`memory/peak_mib` from the training log: on GPU
`torch.cuda.max_memory_allocated`, on CPU the process's peak resident set, which includes ~0.5 GiB of libraries)
and the optimizer-state bytes per rank from the checkpoint files (exact, not sampled). Frozen parameters (expert 0,
attention, embeddings) hold no optimizer state: the bytes are compared with 8 bytes (Adam's two fp32 moments) per
trainable parameter per rank (plus ZeRO's fp32 master copy when the model trains in bf16).

    DS_ACCELERATOR=cpu python bench/memory_bench.py                    # hidden 512, 8 layers, 4 experts per layer
    python bench/memory_bench.py --hidden 2048 --ffn 5504 --layers 24  # on GPUs (bf16 from the stage-1 JSON)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import (  # noqa: E402
    add_launch_flags,
    bench_device,
    launch,
    optimizer_bytes_per_rank,
    peak_mib,
    random_base,
    write_result,
)

from layermoe_ds.config import parse_groups  # noqa: E402

VARIANTS = {  # name → (ZeRO stage, activation checkpointing)
    "no ZeRO": (0, False),
    "ZeRO-1": (1, False),
    "ZeRO-2": (2, False),
    "ZeRO-2 + activation checkpointing": (2, True),
}


def trainable_new_expert_params(hidden: int, ffn: int, layers: int, experts: int) -> int:
    """Stage 1 trains the new experts (3 matrices each) and the routers."""
    return layers * ((experts - 1) * 3 * hidden * ffn + hidden * experts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "artifacts" / "tokenizer")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--language-groups", default="en,de;fr,ru,el")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4, help="experts per layer (expert 0 included)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    add_launch_flags(parser, 29_631)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_bench.json")
    args = parser.parse_args(argv)
    import deepspeed
    import torch

    groups = parse_groups(args.language_groups)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = random_base(args.tokenizer_from, tmp / "base", args.hidden, args.ffn, args.layers, args.heads)
        allocation = tmp / "allocation.json"
        allocation.write_text(json.dumps({"experts_per_layer": [args.experts] * args.layers, "classifier_layers": []}))
        for index, (name, (zero, checkpointing)) in enumerate(VARIANTS.items()):
            zero_json = tmp / f"zero{zero}.json"
            zero_json.write_text(json.dumps({"zero_optimization": {"stage": zero}}))
            config = {
                "model": str(base),
                "allocation": str(allocation),
                "data": str(args.data.resolve()),
                "language_groups": groups,
                "steps": args.steps,
                "seq_len": args.seq_len,
                "lr": 1e-4,
                "save_every": args.steps,
                "log_every": args.steps,
                "activation_checkpointing": checkpointing,
                "out": str(tmp / f"run{index}"),
            }
            run_dir = launch(
                1, args.ranks, config, "stage1_zero2.json", tmp, args.port + index, [zero_json], args.launcher
            )
            results[name] = {
                "zero_stage": zero,
                "activation_checkpointing": checkpointing,
                "peak_mib_max_over_ranks": peak_mib(run_dir),
                "optimizer_bytes_per_rank": optimizer_bytes_per_rank(run_dir),
            }
    none = results["no ZeRO"]
    trainable = trainable_new_expert_params(args.hidden, args.ffn, args.layers, args.experts)
    summary = {
        "zero1_over_none_optimizer_bytes": results["ZeRO-1"]["optimizer_bytes_per_rank"]
        / none["optimizer_bytes_per_rank"],
        "zero2_over_none_optimizer_bytes": results["ZeRO-2"]["optimizer_bytes_per_rank"]
        / none["optimizer_bytes_per_rank"],
        "zero1_over_none_peak": results["ZeRO-1"]["peak_mib_max_over_ranks"] / none["peak_mib_max_over_ranks"],
        "zero2_over_none_peak": results["ZeRO-2"]["peak_mib_max_over_ranks"] / none["peak_mib_max_over_ranks"],
        "checkpointing_over_zero2_peak": results["ZeRO-2 + activation checkpointing"]["peak_mib_max_over_ranks"]
        / results["ZeRO-2"]["peak_mib_max_over_ranks"],
        "adam_bytes_if_unsharded": 8 * trainable,
    }
    print(
        f"stage 1 on {args.ranks} ranks, random Llama hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, "
        f"{args.experts} experts/layer ({trainable / 1e6:.1f}M trainable), seq {args.seq_len}, {args.steps} steps"
    )
    print(f"  {'variant':<36} {'peak MiB (max rank)':>20} {'optimizer MB/rank':>18}")
    for name, row in results.items():
        print(f"  {name:<36} {row['peak_mib_max_over_ranks']:>20.0f} {row['optimizer_bytes_per_rank'] / 1e6:>18.1f}")
    print(
        f"  optimizer state per rank vs no ZeRO: ZeRO-1 {summary['zero1_over_none_optimizer_bytes']:.2f}x, "
        f"ZeRO-2 {summary['zero2_over_none_optimizer_bytes']:.2f}x; Adam moments of the trainable parameters, "
        f"unsharded: {summary['adam_bytes_if_unsharded'] / 1e6:.1f} MB (frozen parameters hold none)"
    )
    print(
        f"  peak vs no ZeRO: ZeRO-1 {summary['zero1_over_none_peak']:.2f}x, "
        f"ZeRO-2 {summary['zero2_over_none_peak']:.2f}x; "
        f"activation checkpointing / ZeRO-2 {summary['checkpointing_over_zero2_peak']:.2f}x"
    )
    report = {
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if bench_device() != "cpu" else "cpu",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "shape": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "experts", "seq_len", "steps")},
        "ranks": args.ranks,
        "variants": results,
        "summary": summary,
    }
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
