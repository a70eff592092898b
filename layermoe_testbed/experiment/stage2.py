"""What stage 2 keeps of stage 1: per MoE system over its seeds, how close Old-avg comes back to the dense base and
which share of stage 1's New-avg gain over the dense base survives, against the paper's behaviour (the targets)."""

from __future__ import annotations

from layermoe_testbed.experiment.presets import DENSE_BASE, Preset, RunId
from layermoe_testbed.experiment.reading import Stats, average, routing_summary, runs_of, stats

OLD_WITHIN = 0.02  # Old-avg after stage 2 within 2% of the dense base's
GAIN_KEPT = 0.80  # at least 80% of stage 1's New-avg gain over the dense base kept after stage 2
SD_RATIO = 2.0  # New-avg's seed sd after stage 2 at most twice stage 1's


def gain_kept(dense_new: float, stage1_new: float, stage2_new: float) -> float | None:
    """(dense − after stage 2) ÷ (dense − after stage 1) on New-avg bits per byte; None when stage 1 gained nothing."""
    gained = dense_new - stage1_new
    return (dense_new - stage2_new) / gained if gained > 0 else None


def stage2_summary(results: dict[RunId, dict], preset: Preset) -> dict[str, dict]:
    """System → its seeds' Old/New-avg after each stage, the gain kept, the sd ratio, and which targets it meets."""
    dense = results[RunId(DENSE_BASE)]["eval"]
    dense_old, dense_new = average(dense, "old"), average(dense, "new")
    summary = {}
    for system in preset.systems:
        runs = [r for r in runs_of(results, system.name) if "eval_stage1" in r]
        if not runs:
            continue

        def over_seeds(key: str, group: str, runs=runs) -> Stats:
            return stats([average(r[key], group) for r in runs])

        old1, old2 = over_seeds("eval_stage1", "old"), over_seeds("eval", "old")
        new1, new2 = over_seeds("eval_stage1", "new"), over_seeds("eval", "new")
        kept_each = [gain_kept(dense_new, average(r["eval_stage1"], "new"), average(r["eval"], "new")) for r in runs]
        kept = stats(kept_each) if None not in kept_each else None
        old_vs_dense = old2.mean / dense_old - 1
        sd_ratio = new2.sd / new1.sd if new1.n > 1 and new1.sd > 0 else None
        entry = {
            "seeds": len(runs),
            "stage2": dict(system.stage2),
            "old_stage1": old1.as_dict(),
            "old": old2.as_dict(),
            "old_vs_dense": old_vs_dense,
            "new_stage1": new1.as_dict(),
            "new": new2.as_dict(),
            "gain_kept": kept.as_dict() if kept else None,
            "new_sd_ratio": sd_ratio,
            "meets": {
                "old_within_2pct": old_vs_dense <= OLD_WITHIN,
                "gain_kept_80pct": kept is not None and kept.mean >= GAIN_KEPT,
                "sd_at_most_2x": sd_ratio is not None and sd_ratio <= SD_RATIO,
            },
        }
        share = {key: _new_expert0_share(runs, key, preset) for key in ("eval_stage1", "eval")}
        if None not in share.values():
            entry["new_expert0_share"] = {"stage1": share["eval_stage1"], "stage2": share["eval"]}
        if all("eval_router_only" in r for r in runs):
            entry["router_only"] = {g: over_seeds("eval_router_only", g).as_dict() for g in ("old", "new")}
        summary[system.name] = entry
    return summary


def _new_expert0_share(runs: list[dict], key: str, preset: Preset) -> float | None:
    """Mean over seeds, new languages and MoE layers of the share of new-language tokens whose top route is expert 0
    (the original FFN): how far stage 2 has sent the new languages back to it."""
    if any("routing" not in run[key] for run in runs):
        return None
    shares = [routing_summary(run[key]["routing"])["expert0_share"] for run in runs]
    values = [share[lang] for share in shares for lang in preset.new if lang in share]
    return sum(values) / len(values) if values else None


def _cell(entry: dict | None) -> str:
    return "-" if entry is None else str(Stats(**entry))


def _percent(entry: dict) -> str:
    return f"{100 * entry['mean']:.0f} ± {100 * entry['sd']:.0f}%" if entry["n"] > 1 else f"{100 * entry['mean']:.0f}%"


def stage2_table(summary: dict[str, dict], dense_old: float, dense_new: float) -> list[str]:
    if not summary:
        return []
    lines = [
        "## Stage 2: what it keeps",
        "",
        f"Dense base: Old-avg {dense_old:.3f}, New-avg {dense_new:.3f}. Gain kept = (dense − after stage 2) ÷ (dense − "
        "after stage 1) on New-avg, per seed; new → expert 0: the share of new-language tokens whose top route is the "
        "original FFN, mean over layers. Targets (the paper's behaviour): Old-avg within "
        f"{OLD_WITHIN:.0%} of the dense base, ≥ {GAIN_KEPT:.0%} of the gain kept, New-avg seed sd after stage 2 ≤ "
        f"{SD_RATIO:g}× stage 1's. Router alone: the same stage-2 model evaluated with classifier routing off.",
        "",
        "| system | seeds | Old-avg stage 1 | Old-avg stage 2 | Old vs dense | New-avg stage 1 | New-avg stage 2 | "
        "gain kept | New sd × | new → expert 0, stage 1 → 2 | router alone Old / New | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        kept = e["gain_kept"]
        kept_text = "-" if kept is None else _percent(kept)
        router = e.get("router_only")
        router_text = f"{_cell(router['old'])} / {_cell(router['new'])}" if router else "-"
        ratio = "-" if e["new_sd_ratio"] is None else f"{e['new_sd_ratio']:.1f}"
        met = sum(e["meets"].values())
        share = e.get("new_expert0_share")
        share_text = f"{share['stage1']:.0%} → {share['stage2']:.0%}" if share else "-"
        lines.append(
            f"| {name} | {e['seeds']} | {_cell(e['old_stage1'])} | {_cell(e['old'])} | {e['old_vs_dense']:+.1%} | "
            f"{_cell(e['new_stage1'])} | {_cell(e['new'])} | {kept_text} | {ratio} | {share_text} | {router_text} | "
            f"{met}/3 |"
        )
    return lines
