"""What the training step's memory measures cost in time and save in memory, side by side in one run.

    python bench/step_memory_bench.py                 # Qwen2-0.5B's head and FFN: h 896, vocabulary 151,936, FFN 4,864
    python bench/step_memory_bench.py --device cuda   # on a GPU (peak = torch.cuda.max_memory_allocated)

Four pairs, forward + backward of one micro-batch (frozen weights, inputs that need a gradient, as in both stages):
- the next-token loss: Hugging Face's (full logits, then cross-entropy) vs the fused, chunked one
  (`modeling/lm_loss.py`); and the same at Gemma's shape of head (`--softcap-vocab`, 262,144, soft-capped at 30)
- `--layers` SwiGLU feed-forwards in sequence over T token slots: autograd's (keeps three activations each) vs the
  lean one (`training/lean_ffn.py`, keeps two)
- `--layers` LayerMoE blocks in bf16 (4 experts, top-2, a classifier): the router/classifier GEMM and the expert
  combine as autograd saves them (fp32 upcasts of [T, H]) vs `fp32_linear` and `scaled_index_add` (bf16 saved);
  memory here is the bytes saved for backward, on either device

Time: the median of `--repeats` interleaved runs. Memory: on CPU (Linux) the peak resident memory of a child
process during the second of two runs of one variant (allocations of 4 MiB and more unmapped when freed, as training
sets up a CPU rank; the kernel's peak mark reset between them) above its resident memory before it; on CUDA the
peak allocated bytes above those before. Prints ratios (lean ÷ plain); writes bench/results/step_memory_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import write_result  # noqa: E402


class _Cfg:
    hidden_act, mlp_bias = "silu", False

    def __init__(self, hidden: int, ffn: int):
        self.hidden_size, self.intermediate_size = hidden, ffn


def _moe_blocks(args, device):
    """`--layers` LayerMoE blocks in bf16 (expert 0 + 3 new SwiGLU experts, top-2, a classifier) over T tokens."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaMLP

    from layermoe_ds.modeling.remote.layermoe_block import LayerMoEBlock, LayerMoEGate

    torch.manual_seed(0)
    blocks = []
    for _ in range(args.layers):
        experts = [LlamaMLP(_Cfg(args.hidden, args.ffn)) for _ in range(4)]
        block = LayerMoEBlock(experts, LayerMoEGate((0, 1, 1, 1), 2), args.hidden, 2).to(device, torch.bfloat16)
        for name, param in block.named_parameters():  # stage 1: routers and new experts train
            param.requires_grad_(name.startswith(("router.", "experts.")) and not name.startswith("experts.0."))
        blocks.append(block)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    return x.requires_grad_(True), blocks


@contextlib.contextmanager
def _autograd_gating(enabled: bool):
    """The gate and combine as autograd would save them: the fp32 upcasts of the router's input and of each
    expert's output kept for backward (what `fp32_linear` and `scaled_index_add` avoid)."""
    import torch.nn.functional as F

    import layermoe_ds.modeling.remote.layermoe_block as block_module

    saved = block_module.fp32_linear, block_module.scaled_index_add
    if enabled:
        block_module.fp32_linear = lambda x, w: F.linear(x.float(), w.float())
        block_module.scaled_index_add = lambda out, i, routed, w: out.index_add(0, i, routed.float() * w[:, None])
    try:
        yield
    finally:
        block_module.fp32_linear, block_module.scaled_index_add = saved


def _inputs(kind: str, args, device):
    import torch

    if kind == "moe_block":
        return _moe_blocks(args, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    if kind in ("loss", "loss_softcap"):
        vocab = vocab_of(kind, args)
        hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
        weight = (torch.randn(vocab, args.hidden, generator=g) * 0.02).to(device)
        targets = torch.randint(0, vocab, (args.tokens,), generator=g).to(device)
        return hidden, weight, targets
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
    weights = [(torch.randn(o, i, generator=g) * 0.02).to(device) for o, i in ((args.ffn, args.hidden),) * 2]
    return x, *weights, (torch.randn(args.hidden, args.ffn, generator=g) * 0.02).to(device)


def _step(kind: str, lean: bool, inputs, chunk: int, layers: int = 1):
    import torch
    import torch.nn.functional as F

    from layermoe_ds.modeling.lm_loss import Head, linear_cross_entropy
    from layermoe_ds.training.lean_ffn import silu_mul

    if kind == "moe_block":
        x, blocks = inputs
        out = x
        with _autograd_gating(not lean):
            for block in blocks:
                out = out + block(out)
        loss = out.float().square().mean()
    elif kind == "loss":
        hidden, weight, targets = inputs
        if lean:
            loss = linear_cross_entropy(hidden, weight, targets, chunk)
        else:
            loss = F.cross_entropy((hidden @ weight.T).float(), targets)
    elif kind == "loss_softcap":  # Gemma's head: c·tanh(logits / c), as Gemma2ForCausalLM computes it, then HF's loss
        hidden, weight, targets = inputs
        if lean:
            loss = linear_cross_entropy(hidden, weight, targets, chunk, Head(softcap=SOFTCAP))
        else:
            loss = F.cross_entropy((torch.tanh((hidden @ weight.T) / SOFTCAP) * SOFTCAP).float(), targets)
    else:  # `--layers` residual FFNs (one set of weights): their saved activations are alive together, as in a model
        x, w_gate, w_up, w_down = inputs
        out = x
        for _ in range(layers):
            gate, up = out @ w_gate.T, out @ w_up.T
            out = out + (silu_mul(gate, up) if lean else F.silu(gate) * up) @ w_down.T
        loss = out.square().mean()
    loss.backward()
    inputs[0].grad = None


def _synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_for_backward_mib(kind: str, lean: bool, inputs, args) -> float:
    """The activations autograd keeps for the backward during the forward (each storage once, weights left out): the
    activation memory a step holds at its peak, measured exactly, where RSS cannot see allocations below the
    allocator's unmapping threshold."""
    import torch

    seen: dict[int, int] = {}
    _, blocks = inputs
    weights = {p.untyped_storage().data_ptr() for block in blocks for p in block.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # activations, not the (frozen) weights; views of one storage once
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _step(kind, lean, inputs, 0, args.layers)
    return sum(seen.values()) / 2**20


def child(kind: str, lean: bool, args) -> float:
    """Peak memory (MiB) of one variant's step above what the process held before it; for the LayerMoE blocks, the
    bytes saved for backward (`saved_for_backward_mib`)."""
    import psutil
    import torch

    from layermoe_ds.distributed import return_large_frees_to_os

    torch.set_num_threads(args.threads)
    inputs = _inputs(kind, args, args.device)
    if kind == "moe_block":
        return saved_for_backward_mib(kind, lean, inputs, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(kind, lean, inputs, chunk_of(kind, args), args.layers)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return_large_frees_to_os()
    # A first step pays the libraries' one-time set-up, which stays resident, while its own tensors go back to the
    # OS. Then the kernel's peak-resident mark (VmHWM) is reset to what is resident now (Linux >= 4.0), so neither
    # building the inputs nor the first step counts: the mark after the second step is that step's peak.
    _step(kind, lean, inputs, chunk_of(kind, args), args.layers)
    Path("/proc/self/clear_refs").write_text("5")
    before = psutil.Process().memory_info().rss
    _step(kind, lean, inputs, chunk_of(kind, args), args.layers)
    status = Path("/proc/self/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return (peak_kib * 1024 - before) / 2**20


KINDS = ("loss", "loss_softcap", "swiglu", "moe_block")
SOFTCAP = 30.0  # Gemma-2's final_logit_softcapping


def vocab_of(kind: str, args) -> int:
    return args.softcap_vocab if kind == "loss_softcap" else args.vocab


def chunk_of(kind: str, args) -> int:
    """The fused loss's tokens a chunk, as training picks them for this head."""
    from layermoe_ds.modeling.lm_loss import Head, chunk_tokens_for

    return chunk_tokens_for(vocab_of(kind, args), head=Head(softcap=SOFTCAP) if kind == "loss_softcap" else None)


def timings(args) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(args.threads)
    inputs = {kind: _inputs(kind, args, args.device) for kind in KINDS}
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for kind in KINDS:
            for lean in (False, True):
                _synchronise(args.device)
                started = time.perf_counter()
                _step(kind, lean, inputs[kind], chunk_of(kind, args), args.layers)
                _synchronise(args.device)
                if repeat:
                    times.setdefault(f"{kind}/{'lean' if lean else 'plain'}", []).append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--softcap-vocab", type=int, default=262_144, help="the Gemma-like loss's vocabulary")
    parser.add_argument("--ffn", type=int, default=4_864)
    parser.add_argument("--tokens", type=int, default=256, help="tokens (loss) and expert slots (FFN) per step")
    parser.add_argument("--layers", type=int, default=8, help="FFNs in sequence (their activations add up)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_memory_bench.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, variant = args.child.split("/")
        print(json.dumps(child(kind, variant == "lean", args)))
        return 0
    forwarded = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("hidden", "vocab", "softcap_vocab", "ffn", "tokens", "layers", "threads", "device")
    ]
    memory = {}
    for name in (f"{kind}/{variant}" for kind in KINDS for variant in ("plain", "lean")):
        out = subprocess.run(
            [sys.executable, __file__, f"--child={name}", *forwarded], capture_output=True, text=True, check=True
        )
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    times = timings(args)
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")}, "rows": {}}
    print(
        f"h {args.hidden}, vocabulary {args.vocab}, FFN {args.ffn} × {args.layers} layers, {args.tokens} tokens, "
        f"{args.device}:"
    )
    for kind, label in (
        ("loss", "next-token loss, fused chunked / HF"),
        ("loss_softcap", f"Gemma-like loss (vocabulary {args.softcap_vocab:,}, soft-cap {SOFTCAP:g}), fused / HF"),
        ("swiglu", "SwiGLU FFN, lean / autograd"),
        ("moe_block", "bf16 LayerMoE blocks, gate and combine saving bf16 / autograd's fp32 copies"),
    ):
        plain, lean = (statistics.median(times[f"{kind}/{v}"]) for v in ("plain", "lean"))
        row = {
            "seconds_plain": plain,
            "seconds_lean": lean,
            "time_ratio": lean / plain,
            "peak_mib_plain": memory[f"{kind}/plain"],
            "peak_mib_lean": memory[f"{kind}/lean"],
            "memory_ratio": memory[f"{kind}/lean"] / max(memory[f"{kind}/plain"], 1e-9),
            "memory": "saved_for_backward" if kind == "moe_block" else "peak",
        }
        results["rows"][kind] = row
        measure = "saved for backward" if kind == "moe_block" else "step memory"
        print(
            f"  {label}: time {row['time_ratio']:.2f}x ({plain * 1e3:.1f} → {lean * 1e3:.1f} ms), {measure} "
            f"{row['memory_ratio']:.2f}x ({row['peak_mib_plain']:.0f} → {row['peak_mib_lean']:.0f} MiB)"
        )
    write_result(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
