"""Host reads (GPU→CPU synchronisations) per training step, counted through the real launchers: stage 1 (ZeRO-2,
expert-parallel) and stage 2 on 2 ranks, with and without activation checkpointing, each run's first step counted
by `train.count_host_reads` (`layermoe_ds/training/host_reads.py`), by section, operation and the line that asked.

Budget (issue 29): ≤ 1 read a MoE layer in an expert-parallel micro-step (the dropless capacity, agreed over the
expert-parallel group, read together with expert 0's token count), 1 for the step's metrics. The count does not
depend on the device: the same operations read the device on a GPU.

    DS_ACCELERATOR=cpu python bench/host_reads_bench.py                     # demo artifacts (a 4-layer base)
    DS_ACCELERATOR=cpu python bench/host_reads_bench.py --random-shape 896,4864,24 --experts 3   # 0.5B-like depth
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import add_launch_flags, add_model_flags, launch, use_random_shape, write_result  # noqa: E402

from layermoe_ds.config import parse_groups  # noqa: E402
from layermoe_ds.training.host_reads import HOST_READS  # noqa: E402

SECTIONS = ("micro_step", "optimizer_step", "metrics")


def counted(run_dir: Path) -> dict:
    """Rank 0's counts by section, the MoE layer count, and rank 0's sites of the micro-step's reads."""
    report = json.loads((run_dir / HOST_READS).read_text())
    counts = report["ranks"][0]
    row = {section: counts[section]["total"] for section in SECTIONS}
    row["per_step"] = sum(row.values())
    row["moe_layers"] = report["moe_layers"]
    row["micro_step_per_moe_layer"] = row["micro_step"] / report["moe_layers"]
    row["micro_step_sites"] = report["sites"][0]["micro_step"]
    row["optimizer_step_sites"] = report["sites"][0]["optimizer_step"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, experts=3)
    parser.add_argument("--seq-len", type=int, default=128)
    add_launch_flags(parser, 29_631)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host_reads_bench.json")
    args = parser.parse_args(argv)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        use_random_shape(args, tmp)
        common = {
            "data": str(Path(args.data).resolve()),
            "language_groups": parse_groups(args.language_groups),
            "steps": 1,
            "seq_len": args.seq_len,
            "save_every": 1,
            "count_host_reads": True,
            "stage2_docs_per_old_lang": 200,
            "stage2_docs_per_new_lang": 200,
        }
        stage1 = {
            **common,
            "model": str(Path(args.model).resolve()),
            "allocation": str(Path(args.allocation).resolve()),
        }
        port = args.port
        for checkpointing in (False, True):
            suffix = " + activation checkpointing" if checkpointing else ""
            extra = {"activation_checkpointing": checkpointing}
            s1 = launch(1, 2, {**stage1, **extra, "out": str(tmp / f"s1{suffix}")}, "stage1_zero2.json", tmp, port,
                        launcher=args.launcher)  # fmt: skip
            s2 = launch(2, 2, {**common, **extra, "model": str(s1 / "model"), "out": str(tmp / f"s2{suffix}")},
                        "stage2.json", tmp, port + 1, launcher=args.launcher)  # fmt: skip
            rows[f"stage 1{suffix}"], rows[f"stage 2{suffix}"] = counted(s1), counted(s2)
            port += 2
    model = args.random_shape or args.model
    print(f"host reads per step, rank 0 of 2 ({model}):")
    print(f"  {'run':<36} {'MoE layers':>10} {'micro-step':>11} {'/ layer':>8} {'optimizer':>10} {'metrics':>8}")
    for name, row in rows.items():
        print(
            f"  {name:<36} {row['moe_layers']:>10} {row['micro_step']:>11} {row['micro_step_per_moe_layer']:>8.2f} "
            f"{row['optimizer_step']:>10} {row['metrics']:>8}"
        )
    first = rows["stage 1"]
    print("  stage-1 micro-step reads by site: " + ", ".join(f"{k} ×{v}" for k, v in first["micro_step_sites"].items()))
    write_result(args.out, {"model": model, "seq_len": args.seq_len, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
