"""Profiling throughput vs a plain forward pass over the same tokens (goal: overhead ≤ 1.1×, i.e. ratio ≥ 0.9).

Both are timed side by side, interleaved, in one process: `python bench/profile_bench.py --model artifacts/base`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("artifacts/base"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--langs", default="en,de,fr,ru,el")
    parser.add_argument("--tokens-per-lang", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_bench.json"))
    args = parser.parse_args(argv)

    from layermoe_ds.analysis.similarity import profile_blocks, profile_model
    from layermoe_ds.data.streams import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.hf.load import load_causal_lm

    tokenizer = load_tokenizer(args.model)
    langs = args.langs.split(",")
    streams = open_streams(args.data, tokenizer, args.model, langs, "valid")
    batches = profile_blocks(streams, args.tokens_per_lang, args.seq_len, tokenizer.pad_token_id)
    model = load_causal_lm(args.model)
    tokens = int(batches.mask_BL.sum())

    @torch.no_grad()
    def plain_forward():
        for start in range(0, len(batches.input_ids_BL), args.batch_size):
            model(
                input_ids=batches.input_ids_BL[start : start + args.batch_size],
                attention_mask=batches.mask_BL[start : start + args.batch_size],
            )

    @torch.no_grad()
    def body_forward():  # the decoder stack without the LM head, no hooks: isolates the hooks' own cost
        for start in range(0, len(batches.input_ids_BL), args.batch_size):
            model.model(
                input_ids=batches.input_ids_BL[start : start + args.batch_size],
                attention_mask=batches.mask_BL[start : start + args.batch_size],
            )

    def profile():
        profile_model(model, batches, args.batch_size)

    timings = {"forward": [], "body": [], "profile": []}
    plain_forward()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("forward", plain_forward), ("body", body_forward), ("profile", profile)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    forward_s, profile_s = statistics.median(timings["forward"]), statistics.median(timings["profile"])
    body_s = statistics.median(timings["body"])
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": str(args.model),
        "layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size,
        "tokens": tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "forward_tokens_per_s": tokens / forward_s,
        "profile_tokens_per_s": tokens / profile_s,
        "profile_over_forward_throughput": forward_s / profile_s,
        "hook_overhead_vs_body": profile_s / body_s,
        "timings_s": timings,
    }
    print(f"{'':<10} {'tokens/s':>10}")
    print(f"{'forward':<10} {result['forward_tokens_per_s']:>10.0f}")
    print(f"{'body':<10} {tokens / body_s:>10.0f}   (decoder stack, no LM head, no hooks)")
    print(f"{'profile':<10} {result['profile_tokens_per_s']:>10.0f}")
    print(
        f"profile throughput / plain forward throughput = {result['profile_over_forward_throughput']:.2f}x "
        "(goal >= 0.9)"
    )
    print(f"hook overhead: profile time / decoder-stack time = {result['hook_overhead_vs_body']:.2f}x (goal <= 1.1)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
