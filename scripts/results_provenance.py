"""docs/performance.md's figures (and the README's few real-shape ones), read from bench/results/*.json: one
table, each figure beside the results file it comes from with that file's date, commit and command. The page's
prose says how to read them; no figure is typed there. Rewrites both blocks between their markers:

    python scripts/results_provenance.py            # update docs/performance.md
    python scripts/results_provenance.py --check    # exit 1 if the page is not current (tests/test_docs.py)

A results file with no formatter below, or without provenance, is an error: every file in bench/results/ is on the
page with where it came from.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import portable  # noqa: E402

PAGE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- results table: scripts/results_provenance.py -->", "<!-- end of results table -->"
GIB, MIB = 2**30, 2**20

Figures = Iterator[tuple[str, str]]  # (what, value)


def _x(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}×"


def moe_block(d: dict) -> Figures:
    for name, width in d["widths"].items():
        r, where = width["ratios"], f"h={width['hidden']}, FFN {width['ffn']}, {width['tokens']} tokens"
        yield f"MoE block fwd+bwd ÷ dense FFN, {where}: all tokens on expert 0", _x(r["expert0_only_over_dense"])
        top2 = f"{_x(r['top2_of_4_over_dense'])}; {_x(r['top2_of_8_over_dense'])}"
        yield f"same, {name}: top-2 of 4; top-2 of 8", top2
        yield (
            f"same, {name}: DeepSpeed's stock TopKGate+MOELayer ÷ ours, top-2 of 8",
            _x(r["deepspeed_over_ours_top2_of_8"]),
        )


def stage(d: dict) -> Figures:
    model = str(d["model"])
    model = f"random h, FFN, layers = {model}" if model[:1].isdigit() else f"the {Path(model).name} model"
    yield f"stage-2 step ÷ stage-1 step ({model}, seq {d['seq_len']}, 2 ranks)", _x(d["stage2_over_stage1_step"])
    if "dropless_over_dropping_stage1_step" in d:
        dropped = int(d["stage1_dropping_routes_dropped"])
        yield (
            "same: dropless stage-1 step ÷ capacity-capped (factor 1.25)",
            (f"{_x(d['dropless_over_dropping_stage1_step'])} ({dropped:,} routes dropped by the capped run)"),
        )
    world1, world2 = d["optimizer_bytes_per_rank_world1"] / 1e6, d["optimizer_bytes_per_rank_world2"] / 1e6
    yield (
        "same: ZeRO-1 optimizer state per rank, world 2 ÷ world 1",
        (
            f"{_x(d['zero1_world2_over_world1_optimizer_bytes'])} ({world1:.2f} → {world2:.2f} MB; "
            f"stage 2 {d['stage2_optimizer_bytes_per_rank'] / 1e6:.2f} MB)"
        ),
    )


def memory(d: dict) -> Figures:
    s = d["shape"]
    where = f"h={s['hidden']}, FFN {s['ffn']}, {s['layers']} layers, {s['experts']} experts/layer, {d['ranks']} ranks"
    variants = d["variants"]
    yield (
        f"optimizer state per rank ({where}): " + " / ".join(variants),
        " / ".join(f"{v['optimizer_bytes_per_rank'] / 1e6:.0f} MB" for v in variants.values()),
    )
    peaks = " / ".join(f"{v['peak_mib_max_over_ranks']:,.0f} MiB" for v in variants.values())
    yield "same: peak memory (max over ranks)", peaks


def profile(d: dict) -> Figures:
    yield (
        f"profiling ÷ plain forward throughput ({d['layers']}-layer base, {d['tokens']:,} tokens)",
        _x(d["profile_over_forward_throughput"]),
    )
    yield "same: profiling ÷ decoder-stack-only time (the hooks' own cost)", _x(d["hook_overhead_vs_body"])


def scale(d: dict) -> Figures:
    up = d["upcycle"]
    note = " with activation checkpointing" if d["activation_checkpointing"] else ""
    yield (
        f"`upcycle` of the {d['shape']} shape: peak RSS ÷ output bytes",
        (
            f"{_x(up['peak_mib'] * MIB / up['output_bytes'])} ({up['peak_mib'] / 1024:.2f} GiB for "
            f"{up['output_bytes'] / GIB:.2f} GiB written)"
        ),
    )
    for name in ("stage1", "stage2"):
        s = d[name]
        floor = s["floor_bytes"] + d["baseline_mib"] * MIB
        label = f"stage {name[-1]}{note}, {d['ranks']} CPU ranks: per-rank peak in steps ÷ (floor + baseline)"
        peak = s["steps_peak_mib"] * MIB
        yield label, f"**{_x(peak / floor)}** ({peak / GIB:.2f} ÷ {floor / GIB:.2f} GiB)"
        saved = s["checkpoint_bytes"]
        size = f"{saved / GIB:.2f} GiB" if saved > GIB else f"{saved / 1e6:.1f} MB"
        yield f"same: stage-{name[-1]} checkpoint, size and save time", f"{size} in {s['checkpoint_save_s']:.1f} s"
        e = s["export"]
        yield (
            f"same: stage-{name[-1]} export on rank 0, RSS before → peak",
            (f"{e['rss_before_mib'] / 1024:.2f} → {e['peak_rss_mib'] / 1024:.2f} GiB in {e['seconds']:.1f} s"),
        )


def step_memory(d: dict) -> Figures:
    a = d["args"]
    names = {"loss": f"fused chunked loss ÷ Hugging Face's (vocab {a['vocab']:,}, {a['tokens']} tokens)",
             "loss_softcap": f"same with a soft-capped head (vocab {a['softcap_vocab']:,})",
             "swiglu": f"lean SwiGLU ÷ autograd's ({a['layers']} FFN layers of {a['ffn']:,})",
             "moe_block": f"{a['layers']} bf16 LayerMoE blocks, bf16-saving gate and combine ÷ autograd's"}  # fmt: skip
    for key, row in d["rows"].items():
        yield (
            f"{names.get(key, key)}: time; {row['memory']} memory",
            (
                f"{_x(row['time_ratio'])}; {_x(row['memory_ratio'])} "
                f"({row['peak_mib_plain']:,.0f} → {row['peak_mib_lean']:,.0f} MiB)"
            ),
        )


def host_reads(d: dict) -> Figures:
    for name, row in d["rows"].items():
        where = f"{d['model']}, {row['moe_layers']} MoE layers"
        what = f"host reads a step, {name} ({where}): micro-step / optimizer / metrics"
        yield what, f"{row['micro_step']} / {row['optimizer_step']} / {row['metrics']}"


def data(d: dict) -> Figures:
    r = d["ratios"]
    yield (
        f"stage-1 peak RSS per rank, {d['copies']}× ÷ 1× the new languages' text (fresh; resumed)",
        (f"{_x(r['peak_rss'])}; {_x(r['resumed_peak_rss'])}"),
    )
    yield "same: time to the first step (fresh; resumed)", f"{_x(r['first_step'])}; {_x(r['resumed_first_step'])}"
    for name, row in d["tokenize"].items():
        what = f"`data tokenize` throughput ÷ (workers × the bare encode), {name}, {row['input_mb']:.1f} MB"
        yield what, _x(row["vs_anchor"])


def data_formats(d: dict) -> Figures:
    """The Parquet case of `bench/data_bench.py` (`--no-stage`): its tokenize rows and the format ratios."""
    r = d["format_ratios"]
    yield (
        "`data tokenize` tokens/s from Parquet ÷ from `.jsonl`, the same text, 2 workers",
        _x(r["parquet_vs_jsonl_tokens_per_s"]),
    )
    yield f"same: peak RSS tokenizing the {d['copies']}× Parquet corpus ÷ the 1×", _x(r["parquet_peak_rss_big_vs_1x"])


def precision(d: dict) -> Figures:
    where = f"{d['model'].rstrip('/').split('/')[-1]}, {d['ranks']} CPU ranks, seq {d['seq_len']}"
    flags = ", ".join(d["cpu_bf16_flags"]) or "no bf16 instructions"
    yield f"stage-1 step, bf16 ÷ fp32 ({where}; {flags})", _x(d["bf16_over_fp32_step"])
    yield "same: largest step-wise difference of the next-token loss", f"{d['max_loss_diff']:.4f}"
    tail = d["tail_mean_loss"]
    yield (
        f"same: mean next-token loss over the last third of {d['steps']} steps, fp32 → bf16",
        (f"{tail['fp32']:.4f} → {tail['bf16']:.4f}"),
    )


def generate(d: dict) -> Figures:
    for name, row in d["runs"].items():
        what = (
            f"decode tokens/s, LayerMoE ÷ dense ({d['shape']}, {d['dtype']}, {d['device']}), {name.replace('_', ', ')}"
        )
        yield what, f"{_x(row['ratio'])} (roofline {_x(row['roofline'])}: **{row['of_roofline']:.2f}** of it)"


def compat(d: dict) -> Figures:
    for version, rows in d["versions"].items():

        def works(key: str, rows=rows) -> bool:  # [class, cached = uncached generation, tokens], or the error
            return isinstance(rows.get(key), list) and bool(rows[key][1])

        families = sorted({key.split("/")[0] for key in rows})
        ok = [f for f in families if works(f"{f}/moe")]
        both_fail = [f for f in families if not works(f"{f}/moe") and not works(f"{f}/dense")]
        note = f" ({', '.join(both_fail)}: the dense model fails the same way)" if both_fail else ""
        what = f"exports loaded through remote code and generating, transformers {version}"
        yield what, f"{len(ok)} of {len(families)} families{note}"


FORMATTERS: dict[str, Callable[[dict], Figures]] = {
    "moe_block_bench": moe_block,
    "stage_bench": stage,
    "stage_bench_h512": stage,
    "memory_bench": memory,
    "profile_bench": profile,
    "scale_bench": scale,
    "scale_bench_checkpointing": scale,
    "step_memory_bench": step_memory,
    "host_reads_bench": host_reads,
    "data_bench": data,
    "data_bench_formats": data_formats,
    "precision_bench": precision,
    "generate_bench": generate,
    "transformers_compat": compat,
}


def table() -> str:
    rows = ["| figure | value | from |", "| --- | --- | --- |"]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        results = json.loads(path.read_text())
        if path.stem not in FORMATTERS:
            raise SystemExit(f"{path}: no formatter in scripts/results_provenance.py")
        provenance = results.get("provenance")
        if not provenance:
            raise SystemExit(f"{path}: no provenance (rerun its bench script, which records date, commit, command)")
        source = (
            f"[`{path.name}`](../bench/results/{path.name}), {provenance['date'][:10]}, "
            f"`{provenance['commit'][:12]}`: `{portable(provenance['command'])}`"
        )
        for what, value in FORMATTERS[path.stem](results):
            rows.append(f"| {what} | {value} | {source} |")
    return "\n".join([BEGIN, *rows, END])


README = ROOT / "README.md"
HEADLINE_BEGIN, HEADLINE_END = "<!-- real-shape figures: scripts/results_provenance.py -->", "<!-- end of figures -->"
HEADLINE = {  # file → the rows (by how they start) the README shows
    "scale_bench": ("stage 1", "stage 2", "same: stage-1 checkpoint", "same: stage-2 checkpoint"),
    "data_bench": ("stage-1 peak RSS",),
}


def headline() -> str:
    """The README's few real-shape figures: the same rows as the performance page, from the same files."""
    lines = []
    for stem, starts in HEADLINE.items():
        path = ROOT / "bench" / "results" / f"{stem}.json"
        results = json.loads(path.read_text())
        when = f"{results['provenance']['date'][:10]}, `{results['provenance']['commit'][:12]}`"
        for what, value in FORMATTERS[stem](results):
            if what.startswith(starts):
                lines.append(f"- {what}: {value} ({when})")
    return "\n".join([HEADLINE_BEGIN, *lines, HEADLINE_END])


def replaced(text: str, begin: str, end: str, block: str) -> str:
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + block + text[stop:]


def main(argv: list[str]) -> int:
    pages = {PAGE: replaced(PAGE.read_text(), BEGIN, END, table()),
             README: replaced(README.read_text(), HEADLINE_BEGIN, HEADLINE_END, headline())}  # fmt: skip
    if "--check" in argv:
        return 0 if all(path.read_text() == text for path, text in pages.items()) else 1
    for path, text in pages.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
