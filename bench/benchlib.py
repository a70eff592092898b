"""What the benchmark scripts share: runs through a real launcher (`deepspeed` by default, or torchrun), and what is
read back from them."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from layermoe_ds.distributed import device_and_backend
from layermoe_ds.ds.process import Launcher, cpu_launch_env, stage_command
from layermoe_ds.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def portable(command: str) -> str:
    """A recorded command as any checkout can read it: paths inside this checkout relative to it, other absolute
    paths (another machine's worktree, a data directory) as `<…>/NAME`."""
    words = []
    for word in command.split():
        key, eq, value = word.rpartition("=") if word.startswith("--") and "=" in word else ("", "", word)
        if value.startswith("/"):
            path = Path(value)
            if path.is_relative_to(ROOT):
                value = str(path.relative_to(ROOT)) or "."
            elif (parts := path.parts) and ("bench" in parts or "scripts" in parts):
                value = "/".join(parts[max(i for i, p in enumerate(parts) if p in ("bench", "scripts")) :])
            else:
                value = f"<…>/{path.name}"
        words.append(f"{key}{eq}{value}")
    return " ".join(words)


def write_result(path: Path, results: dict) -> None:
    """A benchmark's JSON with where its figures come from: date, commit (`-dirty` with uncommitted changes) and the
    command that measured them."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # Uncommitted changes to the code, not to the results this and other benchmarks write.
    status = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"]
    dirty = subprocess.run(status, capture_output=True, text=True)
    provenance = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": (commit or "unknown") + ("-dirty" if dirty.stdout.strip() else ""),
        "command": portable(" ".join(["python", *sys.argv])),
    }
    write_json(path, {"provenance": provenance, **results})


def bench_device() -> str:
    """The device a benchmark runs on, by the project's one rule (`distributed.device_and_backend`): this rank's GPU
    where one is visible, the CPU where none is or where `DS_ACCELERATOR=cpu` asks for it (`make bench`)."""
    return device_and_backend("cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" else None)[0]


def add_model_flags(parser, experts: int) -> None:
    """The model a stage benchmark trains: the demo's dense base and allocation, or `--random-shape`."""
    parser.add_argument("--model", default="artifacts/base", help="dense model (upcycled with --allocation)")
    parser.add_argument("--allocation", default="runs/demo/systems/layermoe/allocation.json")
    parser.add_argument("--data", default="data")
    parser.add_argument("--language-groups", default="en,de;fr,ru,el")
    parser.add_argument(
        "--random-shape",
        default=None,
        help="HIDDEN,FFN,LAYERS: a randomly initialised Llama of this shape (tokenizer from --model) with --experts "
        "experts per layer, instead of --model/--allocation as they are",
    )
    parser.add_argument("--experts", type=int, default=experts, help="with --random-shape: experts per layer")


def use_random_shape(args, tmp: Path) -> None:
    """With `--random-shape`: point `args.model` and `args.allocation` at a random base of that shape in `tmp` and
    a uniform allocation of `--experts` (a classifier on the last layer)."""
    if not args.random_shape:
        return
    hidden, ffn, layers = (int(v) for v in args.random_shape.split(","))
    args.model = str(random_base(Path(args.model), tmp / "random_base", hidden, ffn, layers, max(1, hidden // 64)))
    args.allocation = str(tmp / "allocation.json")
    allocation = {"experts_per_layer": [args.experts] * layers, "classifier_layers": [layers - 1]}
    Path(args.allocation).write_text(json.dumps(allocation))


def add_launch_flags(parser, port: int) -> None:
    """--port (the rendezvous port of the first run; later runs take the next ones) and --launcher."""
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--launcher",
        choices=[launcher.value for launcher in Launcher],
        default=Launcher.DEEPSPEED.value,
        help="how each run starts its ranks (torchrun: less start-up; the steps measured are the same)",
    )


def launch(
    stage: int,
    ranks: int,
    config: dict,
    ds_json: str,
    workdir: Path,
    port: int,
    extra_json: list[Path] = (),
    launcher: str = Launcher.DEEPSPEED,
) -> Path:
    """One run through a real launcher; `extra_json` files are merged over the DeepSpeed JSON."""
    import yaml

    run_yaml = workdir / f"stage{stage}_w{ranks}_{port}.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    cpu = bench_device() == "cpu"
    if cpu:
        # The project's CPU launch environment: gloo ranks with a thread each, and DeepSpeed's shm op from the
        # per-venv build the tests made (not a fresh ~40 s compile inside the first run being timed).
        env = cpu_launch_env(PYTHONPATH=str(ROOT))
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = stage_command(stage, run_yaml, ds_json, ranks, port, cpu, extra_json, launcher)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} on {ranks} ranks failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return Path(config["out"])


def step_seconds(run_dir: Path, skip: int) -> float:
    """Median seconds per step from the logged throughput, after `skip` warm-up steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    tokens = (
        resolved["world_size"]
        * resolved["deepspeed"]["train_micro_batch_size_per_gpu"]
        * resolved["train"]["seq_len"]
        * resolved["deepspeed"].get("gradient_accumulation_steps", 1)
    )
    return statistics.median(tokens / r["tokens_per_s"] for r in records[skip:])


def dropped_routes(run_dir: Path) -> float:
    """Routes dropped for lack of expert capacity over the whole run (the `moe/dropped` metric, summed)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("moe/dropped", 0.0) for r in records)


def optimizer_bytes_per_rank(run_dir: Path) -> float:
    """ZeRO: the size of each rank's optimizer-state file. ZeRO stage 0 (stage 2) keeps the optimizer in the model
    state file: the bytes of its state tensors (replicated, so per rank)."""
    import torch

    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    files = list(newest.glob("*optim_states.pt"))
    if files:
        return sum(f.stat().st_size for f in files) / len(files)
    state = torch.load(newest / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]
    return float(
        sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))
    )


def peak_mib(run_dir: Path) -> float:
    """The largest `memory/peak_mib` the run logged (itself the maximum over ranks)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["memory/peak_mib"] for r in records)


def random_base(
    tokenizer_from: Path,
    out: Path,
    hidden: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    arch: str = "llama",
    vocab: int | None = None,
    tie_embeddings: bool = True,
) -> Path:
    """A randomly initialised dense model of the given shape, saved with the tokenizer of `tokenizer_from`
    (`vocab` may exceed the tokenizer's size: real shapes, e.g. Qwen2's ~152K, with a small tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=max(vocab or 0, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
