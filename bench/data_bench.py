"""The data path at two corpus sizes, side by side in one run: `data tokenize` throughput and memory, and what a
stage-1 run costs in memory and start-up time at 1× and 20× the new languages' text, fresh and after a resume.

The corpus is built from the embedded one (`layermoe data build`): old languages as they are, and each new language's
train file once (1×) or 20 times (20×), every copy's lines shuffled differently (seeded), so no two copies tokenize
alike by accident. Printed, each beside its goal:
- `data tokenize` MB/s with 1 and 2 worker processes, beside the tokenizer's own single-threaded batch-encode speed
  measured in this run (the anchor: goal ≥ 0.8 × workers × anchor), and its peak RSS (goal ≤ 1 GiB: the main process
  plus its workers);
- disk bytes per token, the index included (goal ≤ 2.1 for uint16 ids);
- the same text as Parquet (`<lang>.<split>.parquet`, a `text` column, row groups of 10,000 rows) beside it as
  `.jsonl`: tokens/s from Parquet ÷ from `.jsonl` (goal ≥ 0.9), and the peak RSS of tokenizing the 20× Parquet
  corpus ÷ the 1× (goal ≤ 1.1);
- stage 1 on 2 CPU ranks (`memory/peak_mib`: the largest peak RSS of any rank; `time/since_start_s` of the first step:
  process start to the end of the first step) at 1× and 20× (goals: ratio ≤ 1.10 and ≤ 1.2), and the same for a run
  resumed from its checkpoint.

    DS_ACCELERATOR=cpu python bench/data_bench.py   # needs data/, artifacts/tokenizer and artifacts/base (make demo)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import add_launch_flags, launch, write_result  # noqa: E402

OLD, NEW = ["en", "de"], ["fr", "ru", "el"]


def build_corpus(source: Path, out: Path, copies: int) -> Path:
    """Old languages as they are; each new language's train split `copies` times, each copy shuffled (seed = copy)."""
    out.mkdir(parents=True, exist_ok=True)
    for lang in OLD + NEW:
        for split in ("train", "valid", "test"):
            src = source / f"{lang}.{split}.txt"
            if lang in NEW and split == "train":
                lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
                with open(out / src.name, "w", encoding="utf-8") as f:
                    for copy in range(copies):
                        random.Random(copy).shuffle(lines)
                        f.writelines(lines)
            else:
                shutil.copy(src, out / src.name)
    return out


def convert(source: Path, out: Path, fmt: str) -> Path:
    """Every `<lang>.<split>.txt` of `source` as `.jsonl` or `.parquet` (a `text` column), streamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for txt in sorted(source.glob("*.txt")):
        if len(txt.name.split(".")) != 3:
            continue
        target = out / f"{txt.stem}.{fmt}"
        with open(txt, encoding="utf-8") as lines:
            if fmt == "jsonl":
                with open(target, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": line.rstrip("\n")}, ensure_ascii=False) + "\n" for line in lines)
                continue
            schema = pa.schema([("text", pa.string())])
            with pq.ParquetWriter(target, schema) as writer:
                batch = []
                for line in lines:
                    batch.append(line.rstrip("\n"))
                    if len(batch) == 10_000:
                        writer.write_table(pa.table({"text": batch}, schema=schema))
                        batch = []
                if batch:
                    writer.write_table(pa.table({"text": batch}, schema=schema))
    return out


def tokenize_child(data: Path, tokenizer: Path, out: Path, workers: int, chunk_mb: float, anchor_data: Path) -> None:
    """`data tokenize` in its own process, printing its throughput and the peak RSS of it and its workers."""
    from layermoe_ds.data.loading import raw_sources
    from layermoe_ds.data.prepare import tokenize
    from layermoe_ds.data.tokenizer import load_tokenizer

    started = time.perf_counter()
    loaded = load_tokenizer(tokenizer)  # start-up (imports, the tokenizer), reported apart from the throughput
    startup = time.perf_counter() - started
    started = time.perf_counter()
    manifest = tokenize(
        raw_sources(data, OLD + NEW, ["train", "valid", "test"]),
        tokenizer,
        out,
        workers=workers,
        chunk_bytes=int(chunk_mb * 2**20),
        tokenizer=loaded,
        progress=False,
    )
    seconds = time.perf_counter() - started
    main_peak, worker_peak = (
        resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    anchor = anchor_mb_per_s(anchor_data, loaded)  # in this process, right after: the side-by-side reference
    input_bytes = sum(s["size"] for s in manifest["sources"])
    print(
        json.dumps(
            {
                "workers": workers,
                "startup_s": startup,
                "anchor_mb_per_s": anchor,
                "input_mb": input_bytes / 1e6,
                "seconds": seconds,
                "mb_per_s": input_bytes / 1e6 / seconds,
                "main_peak_mib": main_peak,
                "worker_peak_mib": worker_peak,
                "tokens": manifest["totals"]["tokens"],
                "tokens_per_s": manifest["totals"]["tokens"] / seconds,
                "disk_bytes_per_token": manifest["totals"]["disk_bytes_per_token"],
            }
        )
    )


def run_tokenize(data: Path, tokenizer: Path, out: Path, workers: int, chunk_mb: float, anchor_data: Path) -> dict:
    cmd = [sys.executable, __file__, "--tokenize-child", str(data), str(tokenizer), str(out), str(workers)]
    cmd.append(str(anchor_data))
    result = subprocess.run(
        [*cmd, str(chunk_mb)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if result.returncode != 0:
        raise SystemExit(f"data tokenize failed:\n{result.stderr[-3000:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    # The whole tree's bound: the main process and every worker at the largest worker's peak.
    info["tree_peak_mib"] = info["main_peak_mib"] + (workers if workers > 1 else 0) * info["worker_peak_mib"]
    return info


def anchor_mb_per_s(data: Path, tokenizer) -> float:
    """The tokenizer's own batch-encode speed (the call `data tokenize` makes) on the same text as the tokenize run
    (every split of the old and new languages), one thread, 1 MB batches, the text already in memory."""
    from layermoe_ds.data.loading import iter_documents
    from layermoe_ds.data.prepare import batch_encoder

    encode = batch_encoder(tokenizer)
    batches, batch, size, total = [], [], 0, 0
    for lang, split in ((lang, split) for lang in OLD + NEW for split in ("train", "valid", "test")):
        for doc in iter_documents(data, lang, split):
            batch.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= 1 << 20:
                batches.append(batch)
                total, batch, size = total + size, [], 0
    if batch:  # the last, partial batch (all of it on a small test slice)
        batches.append(batch)
        total += size
    started = time.perf_counter()
    for batch in batches:
        encode(batch)
    return total / 1e6 / (time.perf_counter() - started)


def stage1(
    base: Path, data: Path, workdir: Path, port: int, steps: int = 4, resume: bool = True, launcher: str = "deepspeed"
) -> dict:
    """Stage 1 for `steps` steps (checkpoints every 2), then (`resume`) the same run resumed from its step-2
    checkpoint."""
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    allocation = workdir / "allocation.json"
    allocation.write_text(
        json.dumps({"method": "uniform", "experts_per_layer": [3] * layers, "classifier_layers": [layers - 1]})
    )
    config = {
        "model": str(base),
        "allocation": str(allocation),
        "data": str(data),
        "out": str(workdir / "run"),
        "language_groups": [OLD, NEW],
        "steps": steps,
        "seq_len": 128,
        "save_every": 2,
        "log_every": 1,
    }
    run_dir = launch(1, 2, config, "stage1_zero2.json", workdir, port, launcher=launcher)
    fresh = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if not resume:
        return {"fresh": {"first_step_s": fresh[0]["time/since_start_s"]}}
    # A requeue after a kill between the step-2 and step-4 saves: the newest checkpoint is step 2 again.
    for newest in sorted((run_dir / "checkpoints").glob("step_*"))[1:]:
        shutil.rmtree(newest)
    shutil.rmtree(run_dir / "model")
    launch(1, 2, config, "stage1_zero2.json", workdir, port + 1, launcher=launcher)
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][len(fresh) :]
    return {
        "fresh": {"peak_mib": max(r["memory/peak_mib"] for r in fresh), "first_step_s": fresh[0]["time/since_start_s"]},
        "resumed": {
            "first_step": resumed[0]["step"],
            "peak_mib": max(r["memory/peak_mib"] for r in resumed),
            "first_step_s": resumed[0]["time/since_start_s"],
        },
        "losses": [r["loss/ntp"] for r in fresh],
        "resumed_losses": [r["loss/ntp"] for r in resumed],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--tokenize-child":
        data, tokenizer, out, workers, anchor_data, chunk_mb = argv[1:]
        tokenize_child(Path(data), Path(tokenizer), Path(out), int(workers), float(chunk_mb), Path(anchor_data))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "artifacts" / "tokenizer")
    parser.add_argument("--base", type=Path, default=ROOT / "artifacts" / "base")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--chunk-mb", type=float, default=4.0, help="tokenize chunk size (small, to feed 2 workers)")
    add_launch_flags(parser, 29_671)
    parser.add_argument("--no-stage", action="store_true", help="tokenize only (the test-sized run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_bench.json")
    args = parser.parse_args(argv)

    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "copies": args.copies,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {
            "1x": build_corpus(args.data, tmp / "raw_1x", 1),
            f"{args.copies}x": build_corpus(args.data, tmp / "raw_big", args.copies),
        }
        results["tokenize"] = {
            name: run_tokenize(sizes[size], args.tokenizer, tmp / out, workers, args.chunk_mb, sizes["1x"])
            for name, size, out, workers in (
                ("1x, 1 worker", "1x", "tok_1x_w1", 1),
                ("1x, 2 workers", "1x", "tok_1x", 2),
                (f"{args.copies}x, 2 workers", f"{args.copies}x", "tok_big", 2),
            )
        }
        # The same text as .jsonl and as Parquet, 2 workers each (the 1x sources as the anchor's text).
        formats = {
            ("jsonl", "1x"): convert(sizes["1x"], tmp / "jsonl_1x", "jsonl"),
            ("parquet", "1x"): convert(sizes["1x"], tmp / "parquet_1x", "parquet"),
            ("parquet", f"{args.copies}x"): convert(sizes[f"{args.copies}x"], tmp / "parquet_big", "parquet"),
        }
        results["formats"] = {
            f"{fmt} {size}": run_tokenize(
                path, args.tokenizer, tmp / f"tok_{fmt}_{size}", 2, args.chunk_mb, sizes["1x"]
            )
            for (fmt, size), path in formats.items()
        }
        prepared = {"1x": tmp / "tok_1x", f"{args.copies}x": tmp / "tok_big"}
        if args.no_stage:
            prepared = {}
        # One unmeasured launch first: the first process start on a machine pays for cold library pages.
        if prepared:
            (tmp / "warm_up").mkdir()
            stage1(args.base, prepared["1x"], tmp / "warm_up", args.port - 10, 2, False, args.launcher)
        results["stage1"] = {}
        for i, (name, data) in enumerate(prepared.items()):
            (tmp / f"stage_{name}").mkdir()
            results["stage1"][name] = stage1(
                args.base, data, tmp / f"stage_{name}", args.port + 10 * i, launcher=args.launcher
            )

    big = f"{args.copies}x"
    print("anchor: the tokenizer's own batch encode, one thread, on the 1x text, measured in each run's process")
    print("MB/s: from the call to the manifest (chunking, worker start-up, tokenizing, writing, hashing)")
    print(
        f"{'data tokenize':<22} {'MB':>8} {'MB/s':>7} {'anchor':>7} {'÷ workers×anchor':>17} "
        f"{'peak MiB (main/worker/tree)':>28} {'B/token':>8}"
    )
    for name, r in results["tokenize"].items():
        anchor = r["anchor_mb_per_s"]
        ratio = r["mb_per_s"] / (r["workers"] * anchor)
        r["vs_anchor"] = ratio
        peaks = f"{r['main_peak_mib']:.0f}/{r['worker_peak_mib']:.0f}/{r['tree_peak_mib']:.0f}"
        print(
            f"{name:<22} {r['input_mb']:>8.1f} {r['mb_per_s']:>7.2f} {anchor:>7.2f} {ratio:>17.2f} {peaks:>28} "
            f"{r['disk_bytes_per_token']:>8.3f}"
        )
    f = results["formats"]
    results["format_ratios"] = {
        "parquet_vs_jsonl_tokens_per_s": f["parquet 1x"]["tokens_per_s"] / f["jsonl 1x"]["tokens_per_s"],
        "parquet_peak_rss_big_vs_1x": f[f"parquet {big}"]["tree_peak_mib"] / f["parquet 1x"]["tree_peak_mib"],
    }
    print(f"\n{'2 workers':<22} {'tokens/s':>10} {'tree peak MiB':>14}")
    for name, r in f.items():
        print(f"{name:<22} {r['tokens_per_s']:>10.0f} {r['tree_peak_mib']:>14.0f}")
    ratios = results["format_ratios"]
    print(f"Parquet ÷ .jsonl tokens/s: {ratios['parquet_vs_jsonl_tokens_per_s']:.2f} (goal ≥ 0.9); Parquet peak RSS "
          f"{big} ÷ 1x: {ratios['parquet_peak_rss_big_vs_1x']:.2f} (goal ≤ 1.1)")  # fmt: skip
    if args.no_stage:
        write_result(args.out, results)
        return 0
    s1, sb = results["stage1"]["1x"], results["stage1"][big]
    ratios = {
        "peak_rss": sb["fresh"]["peak_mib"] / s1["fresh"]["peak_mib"],
        "first_step": sb["fresh"]["first_step_s"] / s1["fresh"]["first_step_s"],
        "resumed_peak_rss": sb["resumed"]["peak_mib"] / s1["resumed"]["peak_mib"],
        "resumed_first_step": sb["resumed"]["first_step_s"] / s1["resumed"]["first_step_s"],
    }
    results["ratios"] = ratios
    print(f"\nstage 1, 2 CPU ranks   {'1x':>10} {big:>10} {'ratio':>7}  goal")
    for label, key, field, goal in (
        ("peak RSS MiB", "fresh", "peak_mib", "≤ 1.10"),
        ("first step s", "fresh", "first_step_s", "≤ 1.2"),
        ("resumed: peak MiB", "resumed", "peak_mib", "≤ 1.10"),
        ("resumed: first step s", "resumed", "first_step_s", "≤ 1.2"),
    ):
        a, b = s1[key][field], sb[key][field]
        print(f"{label:<22} {a:>10.1f} {b:>10.1f} {b / a:>7.2f}  {goal}")
    write_result(args.out, results)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
