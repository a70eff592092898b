"""Forward+backward time of one LayerMoE block vs the dense FFN and vs DeepSpeed's stock TopKGate + MOELayer.

All variants run interleaved in one process (median of `--repeats`), so the ratios are comparable on a noisy
machine. Goals (issue 5/9): all tokens on expert 0 ≤ 1.15× dense; top-2 of 4 and of 8 ≤ 2.3× dense; ours ≥ 1.0×
as fast as DeepSpeed's stock MoE at equal shapes, dropping no token.

    python bench/moe_block_bench.py                 # tiny (h=128) and 1.8B-like (h=2048, ffn=5504) widths
    python bench/moe_block_bench.py --quick         # test-sized smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaMLP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import write_result  # noqa: E402

from layermoe_ds.modeling.remote.layermoe_block import LayerMoEBlock, LayerMoEGate  # noqa: E402


class _MLPConfig:
    hidden_act, mlp_bias = "silu", False

    def __init__(self, hidden: int, ffn: int):
        self.hidden_size, self.intermediate_size = hidden, ffn


def ours(dense: torch.nn.Module, hidden: int, num_experts: int, force_base: bool = False) -> LayerMoEBlock:
    gate = LayerMoEGate([0] + [1] * (num_experts - 1), top_k=2)
    block = LayerMoEBlock([copy.deepcopy(dense) for _ in range(num_experts)], gate, hidden)
    torch.nn.init.xavier_normal_(block.router.weight)
    block.force_base = force_base
    return block


class DeepSpeedStock(torch.nn.Module):
    """DeepSpeed's own MoE layer (TopKGate top-2 + MOELayer), dropless, every expert a copy of the FFN."""

    def __init__(self, dense: torch.nn.Module, hidden: int, num_experts: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden,
            copy.deepcopy(dense),
            num_experts=num_experts,
            ep_size=1,
            k=2,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.moe.set_deepspeed_parallelism()

    def forward(self, x):
        return self.moe(x)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, projection: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    _sync(x.device)
    start = time.perf_counter()
    out = module(x)
    (out * projection).sum().backward()
    _sync(x.device)
    elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return elapsed


def bench_width(
    name: str, hidden: int, ffn: int, tokens: int, repeats: int, device: str = "cpu", dtype=torch.float32
) -> dict:
    torch.manual_seed(0)
    dense = LlamaMLP(_MLPConfig(hidden, ffn))
    variants = {
        "dense FFN": dense,
        "ours: all tokens on expert 0": ours(dense, hidden, 4, force_base=True),
        "ours: top-2 of 4": ours(dense, hidden, 4),
        "ours: top-2 of 8": ours(dense, hidden, 8),
        "DeepSpeed stock: top-2 of 8": DeepSpeedStock(dense, hidden, 8),
    }
    variants = {label: module.to(device=device, dtype=dtype) for label, module in variants.items()}
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    projection = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    for module in variants.values():  # warm-up
        time_fwd_bwd(module, x, projection)
    times = {label: [] for label in variants}
    for _ in range(repeats):
        for label, module in variants.items():
            times[label].append(time_fwd_bwd(module, x, projection))
    median = {label: statistics.median(t) for label, t in times.items()}
    dense_s = median["dense FFN"]
    ratios = {
        "expert0_only_over_dense": median["ours: all tokens on expert 0"] / dense_s,
        "top2_of_4_over_dense": median["ours: top-2 of 4"] / dense_s,
        "top2_of_8_over_dense": median["ours: top-2 of 8"] / dense_s,
        "deepspeed_over_ours_top2_of_8": median["DeepSpeed stock: top-2 of 8"] / median["ours: top-2 of 8"],
    }
    print(
        f"\n{name}: hidden {hidden}, ffn {ffn}, {tokens} tokens, {device} {str(dtype).removeprefix('torch.')}, "
        f"median of {repeats} (forward+backward)"
    )
    for label, seconds in median.items():
        print(f"  {label:<32} {seconds * 1e3:>9.1f} ms  {seconds / dense_s:>5.2f}x dense")
    print(f"  ours is {ratios['deepspeed_over_ours_top2_of_8']:.2f}x as fast as DeepSpeed's stock MoE (goal >= 1.0)")
    return {"hidden": hidden, "ffn": ffn, "tokens": tokens, "median_s": median, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for the test suite")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16, NCCL")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/moe_block_bench[_gpu].json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    out = args.out or ROOT / "bench" / "results" / f"moe_block_bench{'_gpu' if gpu else ''}.json"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)
    widths = [("tiny", 32, 48, 64)] if args.quick else [("tiny", 128, 352, 4096), ("1.8B-like", 2048, 5504, 1024)]
    if gpu and not args.quick:  # a GPU needs more tokens to be busy: a micro-batch of 4 × 1024 and of 16 × 1024
        widths = [("1.8B-like", 2048, 5504, 4096), ("1.8B-like, 16K tokens", 2048, 5504, 16_384)]
    dtype = torch.bfloat16 if gpu else torch.float32
    results = {name: bench_width(name, h, f, t, args.repeats, args.device, dtype) for name, h, f, t in widths}
    record = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "widths": results,
    }
    write_result(out, record)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
