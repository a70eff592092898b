"""Decoding speed of a LayerMoE model against its dense base, each ratio beside its roofline.

Random weights at a real shape (Qwen2-0.5B by default, the 36-new-expert allocation of scale_bench.py, classifiers
on the seven layers with the most experts). Greedy decoding, batch 1 and 8, from two kinds of prompt that stand for
the two routing regimes of a trained model: "new-language" tokens are routed top-2 everywhere (classifier routing
off: the router picks), "old-language" tokens go to expert 0 alone on the classifier layers (the classifiers say
"old" for every token) and top-2 elsewhere.

Decode rate: new tokens ÷ (time to generate N+1 tokens − time to generate 1), so the prompt's prefill is left out;
the median of `--repeats`, dense and LayerMoE interleaved in one process. Roofline: decoding is bound by the weight
bytes each step reads, so LayerMoE ÷ dense tokens/s can be at most dense bytes ÷ LayerMoE bytes a step, where
LayerMoE reads everything but the FFNs once, and per layer only the experts its batch's tokens chose (counted from
the routes taken during the run). Goal (issue 25): measured ratio ≥ 0.9× the roofline at batch 1.

    python bench/generate_bench.py                       # CPU, Qwen2-0.5B shape, fp32
    python bench/generate_bench.py --device cuda         # a GPU, bf16
    python bench/generate_bench.py --shape 64,128,4 --new-tokens 4 --repeats 1    # test-sized
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from benchlib import bench_device, write_result  # noqa: E402
from scale_bench import ALLOCATIONS  # noqa: E402

from layermoe_ds.analysis.sizing import SHAPES, Shape  # noqa: E402


def models(shape: Shape, experts: list[int], classifiers: list[int], device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from layermoe_ds.modeling.upcycle import upcycle

    config = AutoConfig.for_model(shape.model_type, **shape.hf_kwargs(), max_position_embeddings=4096)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    moe = upcycle(dense, {"experts_per_layer": experts, "classifier_layers": classifiers}).eval()
    with torch.no_grad():
        for block in moe.moe_blocks().values():  # new experts unlike expert 0, as training leaves them
            for p in block.experts[1:].parameters():
                p.add_(torch.randn_like(p) * 0.02)
            if block.classifier is not None:
                block.classifier.weight.zero_()  # equal logits: class 0, "old", for every token
    return dense.to(device, dtype), moe.to(device, dtype)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head once


class RouteBytes:
    """The FFN bytes each forward of the LayerMoE model reads: per MoE layer, the experts any of its tokens chose
    (the routes are kept during the timed runs and counted after them: counting needs a host read)."""

    def __init__(self, moe):
        self.blocks = moe.moe_blocks()
        self.expert_bytes = {layer: weight_bytes(block.experts[0]) for layer, block in self.blocks.items()}
        self.forwards: list[dict[int, torch.Tensor]] = []
        self.handle = None

    def __enter__(self):
        self.forwards.clear()
        last = self.blocks[max(self.blocks)]
        self.handle = last.register_forward_hook(
            lambda *_: self.forwards.append({i: b.aux.expert_ids_TK.clone() for i, b in self.blocks.items()})
        )
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def decode_step_bytes(self, batch: int) -> float:
        """The mean over the forwards of one token a row (the decoding steps; prefill left out)."""
        steps = [
            sum(self.expert_bytes[i] * int(ids[ids >= 0].unique().numel()) for i, ids in forward.items())
            for forward in self.forwards
            if next(iter(forward.values())).shape[0] == batch
        ]
        return statistics.mean(steps)


def decode_rate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """New tokens a second, prefill left out: N·B ÷ (t(N+1 tokens) − t(1 token))."""

    def timed(n: int) -> float:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        one = timed(1)
        full = timed(new_tokens + 1)
    return new_tokens * prompt.shape[0] / max(full - one, 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2-0.5b", help=f"one of {sorted(SHAPES)}, or HIDDEN,FFN,LAYERS")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the GPU when there is one)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate_bench.json")
    args = parser.parse_args(argv)
    device = args.device or bench_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.shape in SHAPES:
        shape, experts = SHAPES[args.shape], ALLOCATIONS[args.shape]
    else:
        hidden, ffn, layers = (int(v) for v in args.shape.split(","))
        shape, experts = Shape(layers, hidden, ffn, 4, 2, 512, True, "qwen2"), [1] + [3] * (layers - 1)
    classifiers = sorted(sorted((i for i, n in enumerate(experts) if n > 1), key=lambda i: (-experts[i], i))[:7])
    dense, moe = models(shape, experts, classifiers, device, dtype)
    routes = RouteBytes(moe)
    non_ffn = weight_bytes(moe) - sum(weight_bytes(block.experts) for block in moe.moe_blocks().values())
    results: dict = {"shape": args.shape, "device": device, "dtype": str(dtype).removeprefix("torch.")}
    results |= {"experts_per_layer": experts, "classifier_layers": classifiers, "new_tokens": args.new_tokens}
    results |= {"dense_bytes_per_step": weight_bytes(dense), "runs": {}}
    print(f"{args.shape} on {device} ({results['dtype']}): {sum(experts) - len(experts)} new experts")
    header = ("batch", "prompts", "dense tok/s", "LayerMoE tok/s", "ratio", "roofline", "of it")
    print("{:>5} {:<13} {:>11} {:>14} {:>6} {:>8} {:>6}".format(*header))
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = torch.randint(3, shape.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        prompt = prompt.to(device)
        for kind, routing in (("new-language", False), ("old-language", True)):
            moe.set_classifier_routing(routing)
            dense_rates, moe_rates = [], []
            with routes:
                for _ in range(args.repeats):
                    dense_rates.append(decode_rate(dense, prompt, args.new_tokens))
                    moe_rates.append(decode_rate(moe, prompt, args.new_tokens))
            moe_bytes = non_ffn + routes.decode_step_bytes(batch)
            ratio = statistics.median(moe_rates) / statistics.median(dense_rates)
            roofline = weight_bytes(dense) / moe_bytes
            row = {
                "dense_tokens_per_s": statistics.median(dense_rates),
                "layermoe_tokens_per_s": statistics.median(moe_rates),
            }
            row |= {
                "ratio": ratio,
                "roofline": roofline,
                "of_roofline": ratio / roofline,
                "layermoe_bytes_per_step": moe_bytes,
            }
            results["runs"][f"batch{batch}_{kind}"] = row
            print(
                f"{batch:>5} {kind:<13} {row['dense_tokens_per_s']:>11.2f} {row['layermoe_tokens_per_s']:>14.2f} "
                f"{ratio:>6.2f} {roofline:>8.2f} {ratio / roofline:>6.2f}"
            )
    write_result(args.out, results)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
