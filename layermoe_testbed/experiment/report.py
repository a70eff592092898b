"""The experiment's outputs, from the results on disk: `results.json` (every number, the verdicts), `report.md` (the
tables and the reading) and the plots."""

from __future__ import annotations

import math
from pathlib import Path

from layermoe_ds.analysis.plots import _pyplot
from layermoe_ds.io import atomic_write_text, read_json, write_json
from layermoe_testbed.experiment.curve import CurvePoint, curve, curve_reading
from layermoe_testbed.experiment.presets import DENSE_BASE, Phase, Preset, RunId, SystemMethod
from layermoe_testbed.experiment.reading import (
    average,
    group_means,
    lifelong_by_system,
    lifelong_reading,
    profile_reading,
    reading,
    routing_summary,
    runs_of,
    seed_stats,
)
from layermoe_testbed.experiment.stage2 import stage2_summary, stage2_table


def write_report(results: dict[RunId, dict], preset: Preset, out: Path) -> Path:
    profile_lines, profile = profile_reading(read_json(out / "similarity.json", "similarity"))
    points = curve(results, preset)
    curve_verdicts, savings = curve_reading(points, preset.reference)
    lifelong = lifelong_by_system(results, preset)
    verdicts = [*reading(results, preset), *curve_verdicts, *lifelong_reading(lifelong, preset)]
    stage2 = stage2_summary(results, preset)
    weights = results[RunId(DENSE_BASE)].get("base_sha256", {})
    write_json(
        out / "results.json",
        {
            "preset": {"old": preset.old, "new": preset.new, "lifelong": preset.lifelong, "base": preset.base,
                       "stage1_steps": preset.stage1_steps, "stage2_steps": preset.stage2_steps},
            "base_sha256": weights,
            "profile": profile,
            "runs": [{**run.as_dict(), "label": run.label, **lean(result)} for run, result in results.items()],
            "seed_stats": seed_table(results, preset),
            "curve": [p.as_dict() for method_points in points.values() for p in method_points],
            "curve_savings": savings,
            "stage2": stage2,
            "verdicts": [v.as_dict() for v in verdicts],
            "lifelong": {
                name: {k: ([s.as_dict() for s in v] if isinstance(v, list) else v) for k, v in entry.items()}
                for name, entry in lifelong.items()
            },
        },
    )  # fmt: skip
    lines = [
        "# LayerMoE experiment report",
        "",
        f"Old languages {', '.join(preset.old)}; new {', '.join(preset.new)}. Held-out test split, bits per byte "
        "(lower is better). Every system: the same data, stage-1 and stage-2 steps and learning rates "
        f"(stage 1 {preset.stage1_steps} steps, stage 2 {preset.stage2_steps}); wall time = both training stages. "
        "Every number here is in `results.json`.",
        "",
        "## Layer profile of the base model",
        "",
        "Weights (sha256): "
        + (", ".join(f"{name} `{digest[:16]}`" for name, digest in weights.items()) if weights else "not recorded")
        + ".",
        "",
        *profile_lines,
        "",
        *main_table(results, preset),
    ]
    spread = seed_table(results, preset)
    if spread:
        lines += ["", "## Seeds", "", "| system | seeds | Old-avg mean ± sd | New-avg mean ± sd |", "|---|---|---|---|"]
        lines += [f"| {name} | {e['seeds']} | {e['old']} | {e['new']} |" for name, e in spread.items()]
    if stage2:
        dense = results[RunId(DENSE_BASE)]["eval"]
        lines += ["", *stage2_table(stage2, average(dense, "old"), average(dense, "new"))]
    if points:
        lines += ["", *curve_table(points)]
    if any(run.phase == Phase.G2 for run in results):
        lines += ["", *lifelong_table(results, preset)]
    if "eval_off_domain" in results[RunId(DENSE_BASE)]:
        lines += ["", *off_domain_table(results)]
    lines += ["", "## Reading", "", *(v.text for v in verdicts), ""]
    lines += ["## Figures", "", "![similarity](similarity.png)", "", "![per-language](per_language.png)", ""]
    lines += ["![routing](routing.png)", ""]
    plot_per_language(results, preset, out)
    plot_routing(results, preset, out)
    if points:
        plot_curve(points, out / "pareto.png")
        lines += ["![budget–quality curve](pareto.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


EVALUATIONS = ("eval", "eval_stage1", "eval_router_only", "eval_later", "eval_off_domain")


def lean(result: dict) -> dict:
    """A run's result for results.json: each evaluation's routing summarised (`routing_summary`)."""
    out = dict(result)
    for key in EVALUATIONS:
        if key in out and "routing" in out[key]:
            out[key] = {**out[key], "routing": routing_summary(out[key]["routing"])}
    return out


def seed_table(results: dict[RunId, dict], preset: Preset) -> dict[str, dict]:
    """System → seeds and Old/New-avg mean ± sd, for systems run with several seeds."""
    table = {}
    for system in preset.systems:
        if len(runs_of(results, system.name)) > 1:
            old, new = seed_stats(results, system.name, "old"), seed_stats(results, system.name, "new")
            table[system.name] = {"seeds": old.n, "old": str(old), "new": str(new),
                                  "old_stats": old.as_dict(), "new_stats": new.as_dict()}  # fmt: skip
    return table


def main_table(results: dict[RunId, dict], preset: Preset) -> list[str]:
    langs = [*preset.old, *preset.new]
    header = ["system", "new experts", "params", "active", *(f"{lang} bpb" for lang in langs)]
    header += ["Old-avg", "New-avg", "Δ Old vs dense", "Δ New vs dense", "Old-avg after stage 1"]
    header += ["New-avg after stage 1", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense = results[RunId(DENSE_BASE)]["eval"]
    for run, result in results.items():
        if run.phase != Phase.G1:
            continue
        ev = result["eval"]
        cells = [run.label, str(result.get("allocation", {}).get("new_experts", 0))]
        cells += [f"{ev['params_total'] / 1e6:.2f}M", f"{ev['params_active'] / 1e6:.2f}M"]
        cells += [f"{ev['languages'][lang]['bpb']:.3f}" for lang in langs]
        cells += [f"{average(ev, g):.3f}" for g in ("old", "new")]
        cells += [f"{average(ev, g) - average(dense, g):+.3f}" for g in ("old", "new")]
        stage1 = result.get("eval_stage1")
        cells += [f"{average(stage1, g):.3f}" if stage1 else "-" for g in ("old", "new")]
        cells += [f"{result['wall_s']:.0f}" if "wall_s" in result else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def curve_table(points: dict[SystemMethod, list[CurvePoint]]) -> list[str]:
    lines = [
        "## Budget–quality curve",
        "",
        "The same total budget (experts per layer, expert 0 included) spread three ways: uniformly (MoE-LPR), by "
        "Eq. 10 (LayerMoE), at random. Mean ± sd where a point ran with several seeds.",
        "",
        "| method | budget/layer | new experts | params | active | Old-avg | New-avg | Old-avg after stage 1 | "
        "New-avg after stage 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, method_points in points.items():
        for p in method_points:
            lines.append(
                f"| {method} | {p.budget_per_layer:g} | {p.new_experts} | {p.params_total / 1e6:.2f}M | "
                f"{p.params_active / 1e6:.2f}M | {p.old} | {p.new} | {p.old_stage1 or '-'} | {p.new_stage1 or '-'} |"
            )
    return lines


def off_domain_table(results: dict[RunId, dict]) -> list[str]:
    """English on the corpus's test split and on text from another source (`data off-domain`), each against the
    dense base: training on the corpus's domain can improve the first while the second is forgotten."""
    dense = results[RunId(DENSE_BASE)]
    corpus, other = dense["eval"]["languages"]["en"]["bpb"], dense["eval_off_domain"]["languages"]["en"]["bpb"]
    lines = [
        "## English off the corpus's domain",
        "",
        "English bits per byte on the corpus's test split and on the Python documentation (`data off-domain`, never "
        f"trained on); the dense base reads {corpus:.3f} and {other:.3f}.",
        "",
        "| system | en (corpus) | Δ vs dense | en (Python docs) | Δ vs dense |",
        "|---|---|---|---|---|",
    ]
    for run, result in results.items():
        if run.phase != Phase.G1 or "eval_off_domain" not in result or run.system == DENSE_BASE:
            continue
        on, off = result["eval"]["languages"]["en"]["bpb"], result["eval_off_domain"]["languages"]["en"]["bpb"]
        lines.append(f"| {run.label} | {on:.3f} | {on / corpus - 1:+.1%} | {off:.3f} | {off / other - 1:+.1%} |")
    return lines


def lifelong_table(results: dict[RunId, dict], preset: Preset) -> list[str]:
    groups = [preset.old, preset.new, preset.lifelong]
    header = ["model", "new experts", *(f"{lang} bpb" for lang in preset.langs), "G0-avg", "G1-avg", "G2-avg"]
    lines = [
        f"## Lifelong expansion: G0 = {','.join(preset.old)} → G1 = {','.join(preset.new)} → "
        f"G2 = {','.join(preset.lifelong)}",
        "",
        "Each system expands again from its G1 model: profile it (G0+G1 against G2), allocate the same way, grow, "
        "stage 1 on G2, stage 2 on all three groups. Bits per byte on the test split; '-' = not evaluated.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    rows = [("dense base", results[RunId(DENSE_BASE)], 0, "eval_later")]
    for run, result in results.items():
        if run.phase == Phase.G2:
            g1 = results[RunId(run.system, run.seed)]
            rows.append((f"{RunId(run.system, run.seed).label} after G1", g1, g1["allocation"]["new_experts"],
                         "eval_later"))  # fmt: skip
            rows.append((f"{RunId(run.system, run.seed).label} after G2", result, result["new_experts_total"], None))
    for name, result, experts, later in rows:
        langs = {**result["eval"]["languages"], **(result[later]["languages"] if later else {})}
        cells = [name, str(experts)]
        cells += [f"{langs[lang]['bpb']:.3f}" if lang in langs else "-" for lang in preset.langs]
        cells += [f"{m:.3f}" if m is not None else "-" for m in group_means(langs, groups)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_per_language(results: dict[RunId, dict], preset: Preset, out: Path) -> None:
    plt = _pyplot()
    langs = [*preset.old, *preset.new]
    runs = [run for run in results if run.phase == Phase.G1 and run.seed == 0]
    fig, ax = plt.subplots(figsize=(1.2 * len(langs) * max(len(runs), 2) / 2 + 2, 3.5))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [results[run]["eval"]["languages"][lang]["bpb"] for lang in langs]
        ax.bar([x + i * width for x in range(len(langs))], values, width, label=run.label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(langs))], langs)
    ax.set_ylabel("bits per byte (test)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "per_language.png", dpi=120)
    plt.close(fig)


def plot_routing(results: dict[RunId, dict], preset: Preset, out: Path) -> None:
    """Per MoE system (seed 0, G1): the share of each language's tokens routed to expert 0, per layer."""
    plt = _pyplot()
    langs = [*preset.old, *preset.new]
    runs = [run for run, r in results.items() if "routing" in r["eval"] and run.phase == Phase.G1 and run.seed == 0]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        layers = results[run]["eval"]["routing"]["layers"]
        grid = [[layers[layer]["expert0_share"][lang] for lang in langs] for layer in layers]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(layers)), list(layers))
        ax.set_title(run.label, fontsize=7)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens → expert 0")
    fig.savefig(out / "routing.png", dpi=120)
    plt.close(fig)


def plot_curve(points: dict[SystemMethod, list[CurvePoint]], path: Path) -> None:
    """New-avg and Old-avg against new experts, one line per method after stage 2 and a dashed one after stage 1
    (error bars: sd over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, group in zip(axes, ("new", "old"), strict=True):
        for i, (method, method_points) in enumerate(points.items()):
            xs = [p.new_experts for p in method_points]
            values = [getattr(p, group) for p in method_points]
            color = f"C{i}"
            ax.errorbar(xs, [v.mean for v in values], yerr=[v.sd for v in values], marker="o", capsize=3,
                        color=color, label=f"{method}, stage 2")  # fmt: skip
            before = [getattr(p, f"{group}_stage1") for p in method_points]
            if all(v is not None for v in before):
                ax.errorbar(xs, [v.mean for v in before], yerr=[v.sd for v in before], marker="s", capsize=3,
                            color=color, linestyle="--", alpha=0.6, label=f"{method}, stage 1")  # fmt: skip
        ax.set_xlabel("new experts (total over layers)")
        ax.set_ylabel(f"{group.capitalize()}-avg bits per byte (test)")
        ax.set_title(f"{group.capitalize()} languages")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finite_table(results: dict[RunId, dict]) -> bool:
    """Every number in the report's rows is finite."""
    for result in results.values():
        for key in ("eval", "eval_stage1", "eval_later"):
            if key in result:
                ev = result[key]
                values = [v["bpb"] for v in ev["languages"].values()]
                values += [ev[key]["bpb"] for key in ("old_avg", "new_avg") if key in ev]
                if not all(math.isfinite(v) for v in values):
                    return False
    return True
