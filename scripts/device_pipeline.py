"""The whole pipeline on whatever device this machine has, timed: profile, allocate, upcycle, stage 1 and stage 2
(through the experiment runner and a real launcher: the GPUs in bf16 where there are any, else CPU ranks in fp32),
evaluation, `export --checkpoint`, the export loaded through its remote code alone, and cached against uncached
greedy generation. `scripts/device_check.sh` runs it on a lent GPU; its `--smoke` mode runs it here, tiny.

The model is the real base's shape (`--shape-from`: a directory with its config.json and tokenizer, e.g.
artifacts/smollm2 without its 538 MB of weights, which cannot travel to a lent machine) with random weights: the
timings and the code path are the point, not the scores. The systems are the `real` preset's uniform MoE-LPR at
1 new expert a layer and LayerMoE at 24 new, at `--steps` stage-1 steps.

    python scripts/device_pipeline.py --shape-from artifacts/smollm2 --data data --out device-check/pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def random_dense(shape_from: Path, out: Path, tiny: bool) -> Path:
    """A dense model with `shape_from`'s config (tiny dimensions with `tiny`) and random weights, seed 0, and its
    tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape_from)
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
        config.head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (shape_from / name).is_file():
            shutil.copy(shape_from / name, out / name)
    if not (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
        raise SystemExit(f"--shape-from {shape_from}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return out


def generation_check(export: Path, device: str) -> dict:
    """The export through its remote code alone: greedy generation with and without the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("The help pages say", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    return {"class": type(model).__name__, "cached_equals_uncached": bool(torch.equal(cached, uncached))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape-from", type=Path, default=ROOT / "artifacts" / "smollm2")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="the embedded corpus (raw or tokenized)")
    parser.add_argument("--out", type=Path, default=Path("device-check") / "pipeline")
    parser.add_argument("--steps", type=int, default=60, help="stage-1 steps (stage 2: half)")
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions and 2 steps: the CPU rehearsal")
    args = parser.parse_args()

    from layermoe_ds.cli import main as layermoe
    from layermoe_ds.distributed import device_and_backend
    from layermoe_ds.ds.process import Launcher
    from layermoe_testbed.experiment import PRESETS, RunId, run_experiment
    from layermoe_testbed.experiment.runner import slug

    args.out.mkdir(parents=True, exist_ok=True)
    device = device_and_backend()[0]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dense = random_dense(args.shape_from, args.out / "dense", args.smoke)
    timings["random dense model"] = time.perf_counter() - started
    real = PRESETS["real"]
    systems = tuple(replace(real.system(name), seeds=(0,)) for name in ("MoE-LPR uniform (2/layer)", real.reference))
    if args.smoke:  # 8 layers: 6 new experts over 5 of them, 2 classifier layers
        systems = tuple(replace(s, classifier_layers="2" if s.classifier_layers != "0" else "0") for s in systems)
    steps = 2 if args.smoke else args.steps
    preset = replace(
        real, systems=systems, off_domain=False, stage1_steps=steps, stage2_steps=max(1, steps // 2),
        extra_train={"warmup_steps": 0 if args.smoke else real.extra_train["warmup_steps"]},
        **({"seq_len": 64, "profile_tokens": 2_000, "eval_max_tokens": 2_000, "stage2_docs": 50} if args.smoke else {}),
    )  # fmt: skip
    started = time.perf_counter()
    # its checkpoints kept: the stage-2 checkpoint is exported below (`export --checkpoint`)
    experiment = args.out / "experiment"
    results = run_experiment(preset, dense, args.data, experiment, launcher=Launcher.TORCHRUN, keep_checkpoints=True)
    timings["profile, allocate, upcycle, stages 1 and 2, evaluation"] = time.perf_counter() - started
    stage2 = experiment / "systems" / slug(RunId(real.reference).label) / "stage2"
    started = time.perf_counter()
    export = args.out / "export"
    shutil.rmtree(export, ignore_errors=True)
    if layermoe(["export", "--checkpoint", str(stage2), "--out", str(export)]) != 0:
        raise SystemExit(f"export --checkpoint {stage2} failed")
    timings["export --checkpoint"] = time.perf_counter() - started
    started = time.perf_counter()
    generation = generation_check(export, device)
    timings["load through remote code, generate"] = time.perf_counter() - started
    summary = {
        "device": device,
        "shape_from": str(args.shape_from),
        "smoke": args.smoke,
        "stage1_steps": preset.stage1_steps,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "new_avg_bpb": {run.label: r["eval"]["new_avg"]["bpb"] for run, r in results.items() if "eval" in r},
        "generation": generation,
    }
    (args.out / "pipeline.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if generation["cached_equals_uncached"] else 1


if __name__ == "__main__":
    sys.exit(main())
