"""Models at real size, each figure beside its floor from parameter counts (layermoe_ds/analysis/sizing.py).

A random-weight model of a real shape (default: Qwen2-0.5B — 24 × 896, FFN 4,864, vocabulary 151,936, tied
embeddings — saved in bf16, with the demo tokenizer), then, through the real commands and launcher:
- `layermoe upcycle` (streamed, in the input's dtype): peak RSS and output bytes (goal: peak ≤ 1.3 × output);
- stage 1 on 2 ranks from the dense model + allocation (upcycled on the fly): per-rank peak RSS once set up and
  during the steps, against the stage-1 floor plus the measured process baseline (goal ≤ 1.2×);
- stage 2 from the stage-1 model: the same against its floor;
- the stage-1 and stage-2 checkpoint bytes and save seconds (hashing included), and the final export's peak.
On CPU the runs are fp32 (`ds_configs/cpu.json`); `--gpu` runs them in bf16 on the GPUs (`make bench-gpu`).

    DS_ACCELERATOR=cpu python bench/scale_bench.py                    # ~10 min on 2 cores, ~14 GB of RAM at peak
    python bench/scale_bench.py --shape qwen2-0.5b --steps 3          # on a GPU machine: bf16
    python bench/scale_bench.py --sizing                              # docs/sizing.md's table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import add_launch_flags, bench_device, launch, write_result  # noqa: E402

from layermoe_ds.checkpoints.read import MARKER  # noqa: E402

# Allocations: the one measured on a Qwen2-0.5B shape (budget 48 → 36 new experts); the paper's published
# Llama-3.2-3B list (28 layers, 84 experts); the same list for 28-layer Qwen2-1.5B; and for 32-layer Mistral-7B that
# list with four more layers of its middle value (2): no published list exists for these two.
LLAMA_3B = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]
ALLOCATIONS = {
    "qwen2-0.5b": [1] + [2] * 10 + [3] * 13,
    "qwen2-1.5b": LLAMA_3B,
    "llama-3.2-3b": LLAMA_3B,
    "mistral-7b": LLAMA_3B[:14] + [2] * 4 + LLAMA_3B[14:],
}
GIB = 2**30


def sizing_table(world: int = 8) -> str:
    """Per-rank floors at the paper-like budgets on one 8-GPU node, bf16, ZeRO-2: docs/sizing.md's table."""
    from layermoe_ds.analysis.sizing import SHAPES, stage1_floor, stage2_floor, upcycled_bytes

    lines = [
        f"| model | experts per layer (total) | upcycled bf16 | stage 1 per GPU ({world} GPUs, ZeRO-2) "
        "| of which frozen / trainable+grads / optimizer | stage 2 per GPU |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for name in ("qwen2-1.5b", "llama-3.2-3b", "mistral-7b"):
        shape, counts = SHAPES[name], ALLOCATIONS[name]
        classifiers = sorted(range(len(counts)), key=lambda i: counts[i])[:7]
        one = stage1_floor(shape.counts(), counts, world)
        two = stage2_floor(shape.counts(), counts, classifiers, world)
        lines.append(
            f"| {name} | {min(counts)}–{max(counts)} ({sum(counts)}) | "
            f"{upcycled_bytes(shape.counts(), counts, classifiers) / GIB:.1f} GiB | {one.total / GIB:.1f} GiB | "
            f"{one.frozen / GIB:.1f} / {one.trainable / GIB:.1f} / {one.optimizer / GIB:.1f} GiB | "
            f"{two.total / GIB:.1f} GiB |"
        )
    return "\n".join(lines)


def baseline_mib() -> float:
    """A process that has imported what a trainer imports: what every rank holds before any tensor."""
    code = "import resource, torch, deepspeed, transformers; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def random_dense(shape, tokenizer_from, out, dtype) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = Qwen2Config(
        **shape.hf_kwargs(),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one command: its own rusage (`wait4`), not the largest of every child so far."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{cmd[1]} failed:\n{errors.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def run_summary(run_dir: Path) -> dict:
    census = json.loads((run_dir / "rank_census.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    marker = json.loads((newest / MARKER).read_text())
    return {
        "setup_peak_mib": max(c["setup_peak_mib"] for c in census.values()),
        "loss_chunk_tokens": census["0"]["loss_chunk_tokens"],
        "steps_peak_mib": max(r["memory/peak_mib"] for r in records),
        "materialised_bytes_per_rank": [c["bytes"] for c in census.values()],
        "experts_per_rank": [c["experts"] for c in census.values()],
        "checkpoint_bytes": sum(f["size"] for f in marker["files"].values()),
        "checkpoint_save_s": marker["save_seconds"],
        "export": json.loads((run_dir / "export.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b", help="qwen2-0.5b (default), qwen2-1.5b, …")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "artifacts" / "tokenizer")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank and step (default 1)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both stages recompute activations")
    add_launch_flags(parser, 29_731)
    parser.add_argument("--sizing", action="store_true", help="print the sizing table and exit")
    parser.add_argument("--keep", type=Path, default=None, help="keep the models and runs here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_bench.json")
    args = parser.parse_args(argv)
    if args.sizing:
        print(sizing_table())
        return 0

    from layermoe_ds.analysis.sizing import SHAPES, stage1_floor, stage2_floor, upcycled_bytes

    shape, counts = SHAPES[args.shape], ALLOCATIONS[args.shape]
    classifiers = [i for i, n in enumerate(counts) if n == max(counts)][:7]
    gpu = bench_device() != "cpu"
    dtype = "bfloat16" if gpu else "float32"
    tmp = Path(args.keep or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": args.shape, "experts_per_layer": counts, "dtype": dtype, "ranks": args.ranks}
    results["activation_checkpointing"] = args.activation_checkpointing
    # Not in the floors: the [micro × seq × vocab] fp32 logits Hugging Face's loss would hold several copies of;
    # training's fused loss holds one chunk of them at a time (modeling/lm_loss.py).
    results["logits_bytes"] = args.micro_batch * args.seq_len * shape.vocab * 4
    results["baseline_mib"] = baseline_mib()
    # The trainers return large frees to the OS (distributed.RETURN_FREES_ENV): resident memory then tracks what
    # the tensors need, not what glibc's heap kept of earlier steps.
    from layermoe_ds.distributed import RETURN_FREES_ENV

    os.environ.setdefault(RETURN_FREES_ENV, "1")
    results["cpu_return_frees"] = os.environ[RETURN_FREES_ENV] == "1"
    # In a child process: a forked child's peak RSS counts the parent's pages until it execs, so the bench process
    # itself must stay small for the upcycle's figure to be its own.
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from scale_bench import random_dense; "
        "from layermoe_ds.analysis.sizing import SHAPES; "
        "random_dense(SHAPES[sys.argv[2]], sys.argv[3], sys.argv[4], torch.bfloat16)"
    )
    dense = tmp / "dense"
    subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "bench"), args.shape, str(args.tokenizer_from), str(dense)],
        check=True,
        capture_output=True,
    )
    allocation = tmp / "allocation.json"
    allocation.write_text(
        json.dumps({"method": "layermoe", "experts_per_layer": counts, "classifier_layers": classifiers})
    )

    layermoe = str(Path(sys.executable).parent / "layermoe")
    seconds, peak = measured(
        [layermoe, "upcycle", "--model", str(dense), "--allocation", str(allocation), "--out", str(tmp / "moe")]
    )
    output = sum(p.stat().st_size for p in (tmp / "moe").glob("*.safetensors"))
    results["upcycle"] = {
        "seconds": seconds,
        "peak_mib": peak,
        "output_bytes": output,
        "floor_bytes": upcycled_bytes(shape.counts(), counts, classifiers, "bfloat16"),
    }

    groups = [["en", "de"], ["fr", "ru", "el"]]
    common = {
        "data": str(args.data.resolve()),
        "language_groups": groups,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "save_every": args.steps,
        "log_every": 1,
        "lr": 1e-4,
        "activation_checkpointing": args.activation_checkpointing,
    }
    micro = tmp / "micro_batch.json"
    micro.write_text(json.dumps({"train_micro_batch_size_per_gpu": args.micro_batch}))
    one = launch(
        1,
        args.ranks,
        {**common, "model": str(dense), "allocation": str(allocation), "out": str(tmp / "s1")},
        "stage1_zero2.json",
        tmp,
        args.port,
        extra_json=[micro],
        launcher=args.launcher,
    )
    results["stage1"] = run_summary(one)
    results["stage1"]["floor_bytes"] = stage1_floor(shape.counts(), counts, args.ranks, dtype=dtype).total
    two = launch(
        2,
        args.ranks,
        {**common, "model": str(one / "model"), "out": str(tmp / "s2")},
        "stage2.json",
        tmp,
        args.port + 1,
        extra_json=[micro],
        launcher=args.launcher,
    )
    results["stage2"] = run_summary(two)
    results["stage2"]["floor_bytes"] = stage2_floor(shape.counts(), counts, classifiers, args.ranks, dtype=dtype).total
    results["model_bytes"] = output

    base = results["baseline_mib"]
    up = results["upcycle"]
    print(
        f"{args.shape}: {sum(counts) - len(counts)} new experts, {args.ranks} ranks, {dtype}, micro-batch "
        f"{args.micro_batch} × seq {args.seq_len}, activation checkpointing {args.activation_checkpointing}; "
        f"process baseline {base:.0f} MiB; fp32 logits {results['logits_bytes'] / 2**20:.0f} MiB, of which the "
        f"loss holds {results['stage1']['loss_chunk_tokens'] * shape.vocab * 4 / 2**20:.0f} MiB at a time"
    )
    print(
        f"upcycle: peak {up['peak_mib'] / 1024:.2f} GiB for {up['output_bytes'] / GIB:.2f} GiB written "
        f"(floor {up['floor_bytes'] / GIB:.2f} GiB): {up['peak_mib'] * 2**20 / up['output_bytes']:.2f}x the output "
        "(goal <= 1.3)"
    )
    for stage in ("stage1", "stage2"):
        r = results[stage]
        floor_mib = r["floor_bytes"] / 2**20 + base
        print(
            f"{stage}: set-up peak {r['setup_peak_mib'] / 1024:.2f} GiB, "
            f"steps peak {r['steps_peak_mib'] / 1024:.2f} GiB "
            f"vs floor {floor_mib / 1024:.2f} GiB (parameters {r['floor_bytes'] / GIB:.2f} + baseline): "
            f"{r['steps_peak_mib'] / floor_mib:.2f}x (goal <= 1.2)"
        )
        print(
            f"  checkpoint {r['checkpoint_bytes'] / GIB:.2f} GiB saved in {r['checkpoint_save_s']:.1f} s; "
            f"export: {r['export']['rss_before_mib'] / 1024:.2f} → peak {r['export']['peak_rss_mib'] / 1024:.2f} GiB "
            f"on rank 0 in {r['export']['seconds']:.1f} s"
        )
    results["machine"] = platform.machine()
    write_result(args.out, results)
    if args.keep is None:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
