"""Stage-1 training throughput, MFU and peak memory of a 1.8B-class Qwen2 upcycled with the published 72-expert
LayerMoE allocation, against the same dense model trained in full, through the real launcher and trainer.

Random initialisation with the real shapes (24 layers, hidden 2048, FFN 5504, 16 heads, vocab 151,936, untied
embeddings, sequence 1024), bf16 (the stage-1 JSON), SDPA attention (the Hugging Face default), AdamW. All systems
run in one invocation, so the ratios are measured side by side. FLOPs are counted per token from the *active*
parameters (a token uses expert 0 or up to 2 experts per layer, not all of them; embeddings excluded, LM head
included) plus attention, two ways:
  - `model`: the conventional 6·N_active + 12·layers·hidden·seq (PaLM's count, no causal discount);
  - `needed`: what stage 1 must compute: 2·N_active forward + 2·N_active activation gradients + 2·N_trainable_active
    weight gradients (frozen weights get none) + attention — the honest figure for a mostly frozen model.
MFU = tokens/s per GPU × FLOPs per token / the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, or from the name).
Stage-1 vs dense throughput is compared per token and at equal active parameters (tokens/s × N_active).

    python bench/gpu_bench.py                          # one GPU, seq 1024
    python bench/gpu_bench.py --gpus 8                 # NCCL expert parallelism over 8 GPUs
    DS_ACCELERATOR=cpu python bench/gpu_bench.py --smoke   # tiny shapes on 1 CPU rank (the test suite runs this)
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

from benchlib import add_launch_flags, bench_device, launch, peak_mib, random_base, step_seconds, write_result  # noqa: E402

from layermoe_ds.config import parse_groups  # noqa: E402

# The paper's Qwen1.5-1.8B G1 allocation (experts per layer incl. expert 0; 72 in total, 48 new).
PUBLISHED_72 = [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]
QWEN_1_8B = {"hidden": 2048, "ffn": 5504, "layers": 24, "heads": 16, "vocab": 151_936, "seq_len": 1024}
SMOKE = {"hidden": 64, "ffn": 176, "layers": 4, "heads": 4, "vocab": 8_000, "seq_len": 64}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense


def smoke_allocation(layers: int) -> list[int]:
    """The published list's shape (more experts at both ends, 2 in the middle) scaled to `layers`."""
    return [PUBLISHED_72[round(i * (len(PUBLISHED_72) - 1) / max(1, layers - 1))] for i in range(layers)]


def flops_per_token(shape: dict, experts_per_layer: list[int] | None, top_k: int = 2) -> dict:
    """Parameter counts and FLOPs per token for the dense model (`experts_per_layer` None) or the upcycled one."""
    h, f, layers, vocab, seq = (shape[k] for k in ("hidden", "ffn", "layers", "vocab", "seq_len"))
    attention = 4 * h * h + 2 * h  # q, k, v, o (+ q/k/v biases in Qwen2, negligible) and the norms
    ffn = 3 * h * f
    head = vocab * h  # untied LM head (the input embedding is a lookup: no FLOPs)
    if experts_per_layer is None:
        active = layers * (attention + ffn) + head
        trainable_active = active  # a full fine-tune trains everything (the input embedding too, FLOP-free)
    else:
        active = sum(attention + min(top_k, n) * ffn + (h * n if n > 1 else 0) for n in experts_per_layer) + head
        # Stage 1 trains the new experts and the routers; a token's active new experts are ≤ min(k, N_i − 1).
        trainable_active = sum(min(top_k, n - 1) * ffn + h * n for n in experts_per_layer if n > 1)
    attention_flops = 12 * layers * h * seq
    return {
        "params_active": active,
        "params_trainable_active": trainable_active,
        "model_flops": 6 * active + attention_flops,
        "needed_flops": 4 * active + 2 * trainable_active + attention_flops,
    }


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    import torch

    if bench_device() == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke run of the same code path)")
    parser.add_argument("--gpus", type=int, default=1, help="ranks (GPUs); > 1 runs NCCL expert parallelism")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "artifacts" / "tokenizer")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--language-groups", default="en,de;fr,ru,el")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (smoke: 4); the first third is warm-up")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per step (default 4)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--activation-checkpointing", action="store_true")
    add_launch_flags(parser, 29_651)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/gpu_bench[_smoke].json")
    args = parser.parse_args(argv)
    import deepspeed
    import torch

    shape = SMOKE if args.smoke else QWEN_1_8B
    steps = args.steps or (4 if args.smoke else 20)
    micro = args.micro_batch or 4
    experts = smoke_allocation(shape["layers"]) if args.smoke else PUBLISHED_72
    out = args.out or ROOT / "bench" / "results" / f"gpu_bench{'_smoke' if args.smoke else ''}.json"
    groups = parse_groups(args.language_groups)
    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = random_base(
            args.tokenizer_from,
            tmp / "base",
            shape["hidden"],
            shape["ffn"],
            shape["layers"],
            shape["heads"],
            arch="qwen2",
            vocab=shape["vocab"],
            tie_embeddings=False,
        )
        allocation = tmp / "allocation.json"
        allocation.write_text(json.dumps({"experts_per_layer": experts, "classifier_layers": []}))
        micro_json = tmp / "micro.json"
        micro_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro}))
        common = {
            "model": str(base),
            "data": str(args.data.resolve()),
            "language_groups": groups,
            "steps": steps,
            "seq_len": shape["seq_len"],
            "lr": 1e-5,
            "save_every": 10 * steps,  # no checkpoint inside the measured steps (the final one comes after)
            "log_every": steps,
            "activation_checkpointing": args.activation_checkpointing,
        }
        runs = {
            "dense (full fine-tune)": ({**common, "full_finetune": True}, None),
            f"LayerMoE stage 1 ({sum(experts)} experts)": ({**common, "allocation": str(allocation)}, experts),
        }
        for index, (name, (config, allocation_list)) in enumerate(runs.items()):
            run_dir = launch(
                1,
                args.gpus,
                {**config, "out": str(tmp / f"run{index}")},
                "stage1_zero2.json",
                tmp,
                args.port + index,
                extra_json=[micro_json],
                launcher=args.launcher,
            )
            seconds = step_seconds(run_dir, skip=max(1, steps // 3))
            tokens_per_s_per_rank = micro * shape["seq_len"] / seconds
            counts = flops_per_token(shape, allocation_list)
            systems[name] = {
                "step_s": seconds,
                "tokens_per_s_per_gpu": tokens_per_s_per_rank,
                "peak_mib": peak_mib(run_dir),
                **counts,
            }
    peak = peak_tflops(args.peak_tflops)  # None on a CPU unless given: no made-up MFU
    for row in systems.values():
        for kind in ("model", "needed"):
            row[f"mfu_{kind}"] = row["tokens_per_s_per_gpu"] * row[f"{kind}_flops"] / (peak * 1e12) if peak else None
    dense, moe = systems.values()
    ratios = {
        "moe_over_dense_tokens_per_s": moe["tokens_per_s_per_gpu"] / dense["tokens_per_s_per_gpu"],
        "moe_over_dense_at_equal_active_params": (moe["tokens_per_s_per_gpu"] * moe["params_active"])
        / (dense["tokens_per_s_per_gpu"] * dense["params_active"]),
    }
    on_gpu = bench_device() != "cpu"
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.machine()})"
    print(
        f"{'smoke: ' if args.smoke else ''}Qwen2 hidden {shape['hidden']}, ffn {shape['ffn']}, {shape['layers']} "
        f"layers, vocab {shape['vocab']}, seq {shape['seq_len']}, micro-batch {micro}, {args.gpus} rank(s) on "
        f"{device}; experts per layer {experts}"
    )
    header = f"  {'system':<32} {'tokens/s/GPU':>13} {'active params':>14} {'MFU model':>10} {'MFU needed':>11}"
    print(f"{header} {'peak MiB':>9}")
    for name, row in systems.items():
        mfu = [f"{row[k]:.1%}" if row[k] is not None else "-" for k in ("mfu_model", "mfu_needed")]
        print(
            f"  {name:<32} {row['tokens_per_s_per_gpu']:>13.0f} {row['params_active'] / 1e9:>13.3f}B "
            f"{mfu[0]:>10} {mfu[1]:>11} {row['peak_mib']:>9.0f}"
        )
    print(
        f"  stage 1 / dense: {ratios['moe_over_dense_tokens_per_s']:.2f}x tokens/s, "
        f"{ratios['moe_over_dense_at_equal_active_params']:.2f}x at equal active parameters (goal >= 0.8)"
    )
    if args.gpus == 1:
        print("  one rank: no expert parallelism measured (every layer's experts are local)")
    report = {
        "device": device,
        "gpus": args.gpus,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "accelerator": "cuda" if on_gpu else "cpu",
        "peak_tflops": peak,
        "shape": shape,
        "micro_batch": micro,
        "steps": steps,
        "experts_per_layer": experts,
        "activation_checkpointing": args.activation_checkpointing,
        "systems": systems,
        "ratios": ratios,
    }
    write_result(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
