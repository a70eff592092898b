"""The paper's claims checked against an experiment's numbers: each verdict computed, none typed in.

Numbers are bits per byte on the test split (lower is better). A system run with several seeds is judged by its
mean, and a difference counts only when it exceeds twice the standard error of the difference of the two means
(√(sd_a²/n_a + sd_b²/n_b), sample standard deviations); with one seed on either side, by a 1% relative margin.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from layermoe_testbed.experiment.presets import DENSE_BASE, Phase, Preset, RunId, SystemMethod

RELATIVE_TOLERANCE = 0.01  # single-seed comparisons: "matched" within 1%
VERDICT_WORDS = {
    "better": "replicated.",
    "matched": "no difference beyond the noise here.",
    "worse": "not replicated here.",
}


@dataclass(frozen=True)
class Stats:
    mean: float
    sd: float  # sample standard deviation over seeds; 0 with one seed
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f}" if self.n > 1 else f"{self.mean:.3f}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def stats(values: list[float]) -> Stats:
    return Stats(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def pooled_sd(groups: list[Stats]) -> float:
    """The seed sd pooled over groups (each weighted by its degrees of freedom, n − 1); 0 with none to pool."""
    df = sum(g.n - 1 for g in groups)
    return math.sqrt(sum((g.n - 1) * g.sd**2 for g in groups) / df) if df else 0.0


def compare(ours: float, theirs: float, tolerance: float = RELATIVE_TOLERANCE) -> str:
    """'better', 'matched' (within `tolerance` relative) or 'worse', for a lower-is-better number."""
    if ours < theirs * (1 - tolerance):
        return "better"
    return "matched" if ours <= theirs * (1 + tolerance) else "worse"


def judge(ours: Stats, theirs: Stats) -> tuple[str, str]:
    """('better' | 'matched' | 'worse', how it was decided) for lower-is-better means."""
    if ours.n > 1 and theirs.n > 1:
        noise = 2 * math.sqrt(ours.sd**2 / ours.n + theirs.sd**2 / theirs.n)
        gap = ours.mean - theirs.mean
        verdict = "matched" if abs(gap) <= noise else ("better" if gap < 0 else "worse")
        return verdict, f"Δ {gap:+.3f} vs 2·SE {noise:.3f} over {ours.n}/{theirs.n} seeds"
    return compare(ours.mean, theirs.mean), "one seed: 1% margin"


def average(evaluation: dict, group: str) -> float:
    return evaluation[f"{group}_avg"]["bpb"]


def runs_of(results: dict[RunId, dict], system: str, phase: Phase = Phase.G1) -> list[dict]:
    return [r for run, r in sorted(results.items()) if run.system == system and run.phase == phase]


def seed_stats(results: dict[RunId, dict], system: str, group: str, key: str = "eval") -> Stats | None:
    runs = [r for r in runs_of(results, system) if key in r]
    return stats([average(r[key], group) for r in runs]) if runs else None


def routing_summary(routing: dict) -> dict:
    """Per language, the mean over MoE layers of the share of tokens whose top route is expert 0, and of the
    classifier's accuracy over the layers that have one (the per-layer table stays in each run's eval JSON)."""
    layers = list(routing["layers"].values())
    summary = {"expert0_share": {}, "layers": len(layers)}
    for lang in layers[0]["expert0_share"] if layers else []:
        summary["expert0_share"][lang] = sum(row["expert0_share"][lang] for row in layers) / len(layers)
        accuracy = [row["classifier_accuracy"][lang] for row in layers if "classifier_accuracy" in row]
        if accuracy:
            summary.setdefault("classifier_accuracy", {})[lang] = sum(accuracy) / len(accuracy)
    return summary


def group_means(languages: dict, groups: list[tuple[str, ...]]) -> list[float | None]:
    """Plain mean bits per byte over each group's languages (None where a group was not evaluated)."""
    means = []
    for group in groups:
        values = [languages[lang]["bpb"] for lang in group if lang in languages]
        means.append(sum(values) / len(values) if values and len(values) == len(group) else None)
    return means


# --- the budget–quality curve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One claim checked: its name, the verdict, the report's line (numbers included), and the numbers."""

    claim: str
    verdict: str  # "replicated", "not replicated", "not testable", or judge's "better" / "matched" / "worse"
    text: str
    numbers: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "text": self.text, **self.numbers}


def replicated(ok: bool) -> str:
    return "replicated" if ok else "not replicated"


def reading(results: dict[RunId, dict], preset: Preset) -> list[Verdict]:
    """The paper's claims on the G1 runs: LayerMoE as good as uniform, stage 2 restores, each ablation, dense
    fine-tuning forgets (each where the preset has the rows)."""
    verdicts = [premise(results, preset), as_good_as_uniform(results, preset), stage2_restores(results, preset)]
    verdicts += [ablation(results, preset, s) for s in preset.systems if s.ablates is not None]
    verdicts += finetuning_forgets(results, preset)
    return [v for v in verdicts if v is not None]


def premise(results: dict[RunId, dict], preset: Preset) -> Verdict | None:
    """Layer-wise allocation's premise: the same new experts gain more new-language quality in the least similar
    layers than in the most similar ones (New-avg after stage 1, and after stage 2)."""
    least = next((s.name for s in preset.systems if s.method == SystemMethod.LEAST_SIMILAR), None)
    most = next((s.name for s in preset.systems if s.method == SystemMethod.MOST_SIMILAR), None)
    if not (least and most and runs_of(results, least) and runs_of(results, most)):
        return None
    dense = average(results[RunId(DENSE_BASE)]["eval"], "new")
    parts, numbers = [], {"dense_new": dense, "new_experts": runs_of(results, least)[0]["allocation"]["new_experts"]}
    for key, when in (("eval_stage1", "after stage 1"), ("eval", "after stage 2")):
        ours, theirs = seed_stats(results, least, "new", key), seed_stats(results, most, "new", key)
        if ours is None or theirs is None:
            continue
        verdict, how = judge(ours, theirs)
        parts.append(f"{when} {dense - ours.mean:.3f} vs {dense - theirs.mean:.3f} ({verdict}; {how})")
        numbers[key] = {"verdict": verdict, "least": ours.as_dict(), "most": theirs.as_dict()}
    ok = numbers.get("eval", {}).get("verdict") == "better"
    text = (
        f"- *The premise: new experts gain more in the least similar layers than in the most similar* "
        f"({numbers['new_experts']} new experts each; New-avg gain over the dense base's {dense:.3f}, least vs most "
        f"similar): {'; '.join(parts)} — " + ("replicated." if ok else "not replicated here.")
    )
    return Verdict("premise", replicated(ok), text, numbers)


def as_good_as_uniform(results: dict[RunId, dict], preset: Preset) -> Verdict | None:
    reference, baseline = runs_of(results, preset.reference), runs_of(results, preset.baseline)
    uniform = preset.system(preset.baseline)
    if not (reference and baseline) or uniform is None or uniform.method != SystemMethod.UNIFORM:
        return None
    ours_n, theirs_n = reference[0]["allocation"]["new_experts"], baseline[0]["allocation"]["new_experts"]
    ours = {g: seed_stats(results, preset.reference, g) for g in ("new", "old")}
    theirs = {g: seed_stats(results, preset.baseline, g) for g in ("new", "old")}
    judged = {g: judge(ours[g], theirs[g]) for g in ("new", "old")}
    ok = all(v != "worse" for v, _ in judged.values())
    lead = f"{1 - ours_n / theirs_n:.0%} fewer new experts" if ours_n < theirs_n else f"{ours_n} vs {theirs_n} new"
    text = (
        f"- *As good as uniform MoE-LPR* ({preset.reference}, {lead}, vs {preset.baseline}): New-avg {ours['new']} "
        f"vs {theirs['new']} ({judged['new'][0]}; {judged['new'][1]}), Old-avg {ours['old']} vs {theirs['old']} "
        f"({judged['old'][0]}) — " + ("replicated." if ok else "not replicated here.")
    )
    numbers = {"new": judged["new"][0], "old": judged["old"][0], "new_experts": [ours_n, theirs_n]}
    return Verdict("as good as uniform", replicated(ok), text, numbers)


def stage2_restores(results: dict[RunId, dict], preset: Preset) -> Verdict | None:
    """Of the runs whose stage 1 raised Old-avg above the dense base's, those stage 2 lowered again; not testable
    where stage 1 raised it in none (a corpus of one domain in every language teaches the old language too)."""
    staged = [r for r in results.values() if "eval_stage1" in r]  # the runs with a stage 1 and a stage 2
    if not staged:
        return None
    dense_old = average(results[RunId(DENSE_BASE)]["eval"], "old")
    forgot = [r for r in staged if average(r["eval_stage1"], "old") > dense_old]
    if not forgot:
        moves = [average(r["eval"], "old") - average(r["eval_stage1"], "old") for r in staged]
        text = (
            f"- *Stage 2 restores old languages*: nothing to restore — stage 1 left Old-avg below the dense base's "
            f"({dense_old:.3f}) in all {len(staged)} runs, and stage 2 moved it by {min(moves):+.3f} to "
            f"{max(moves):+.3f} — not testable here."
        )
        return Verdict("stage 2 restores", "not testable", text, {"runs": len(staged), "forgot": 0})
    kept = [r for r in forgot if average(r["eval"], "old") <= average(r["eval_stage1"], "old")]
    reference = runs_of(results, preset.reference)
    example = ""
    if reference and "eval_stage1" in reference[0]:
        before, after = average(reference[0]["eval_stage1"], "old"), average(reference[0]["eval"], "old")
        example = f" ({preset.reference}: {before:.3f} → {after:.3f}; dense {dense_old:.3f})"
    unharmed = len(staged) - len(forgot)
    aside = f"; stage 1 left it below the dense base's in the other {unharmed}" if unharmed else ""
    ok = len(kept) == len(forgot)
    text = (
        f"- *Stage 2 restores old languages*: Old-avg lower after stage 2 than after stage 1 in {len(kept)} of "
        f"{len(forgot)} runs{example}{aside} — " + ("replicated." if ok else "not replicated in every run.")
    )
    numbers = {"runs": len(staged), "forgot": len(forgot), "restored": len(kept)}
    return Verdict("stage 2 restores", replicated(ok), text, numbers)


def ablation(results: dict[RunId, dict], preset: Preset, system) -> Verdict | None:
    """The reference system against `system`, on the average its claim says the ablation should lose on."""
    reference, other = runs_of(results, preset.reference), runs_of(results, system.name)
    if not (reference and other):
        return None
    claim, group = system.ablates, system.ablates.average
    ours, theirs = seed_stats(results, preset.reference, group), seed_stats(results, system.name, group)
    text = f"- *{claim.text}*: {group.capitalize()}-avg {ours} ({preset.reference}) vs {theirs} ({system.name}) — "
    if all(
        reference[0]["allocation"][k] == other[0]["allocation"][k] for k in ("experts_per_layer", "classifier_layers")
    ):
        layers = reference[0]["allocation"]["classifier_layers"]
        text += f"not testable on this model: both put the same experts and classifiers ({layers})."
        return Verdict(claim.text, "not testable", text)
    verdict, how = judge(ours, theirs)
    numbers = {"ours": ours.as_dict(), "theirs": theirs.as_dict()}
    return Verdict(claim.text, verdict, text + f"{how}: " + VERDICT_WORDS[verdict], numbers)


def finetuning_forgets(results: dict[RunId, dict], preset: Preset) -> list[Verdict]:
    """Full fine-tuning forgets the old languages and LayerMoE does not: on the corpus's test split (Old-avg), and on
    English from another source where the preset reads it (`off_domain`); each system's mean over its seeds. Not
    testable where full fine-tuning forgot nothing beyond the 1% margin — the real base's corpus teaches English its
    domain."""
    finetune = next((s.name for s in preset.systems if s.method == SystemMethod.FULL_FINETUNE), None)
    reference, finetuned = runs_of(results, preset.reference), runs_of(results, finetune) if finetune else []
    if not (reference and finetuned):
        return []
    names = (DENSE_BASE, finetune, preset.reference)
    ours = preset.reference + (f" (mean of {len(reference)} seeds)" if len(reference) > 1 else "")
    new = [seed_stats(results, name, "new").mean for name in names[1:]]
    old = [seed_stats(results, name, "old").mean for name in names]
    verdicts = [forgetting("Old-avg", *old, ours, f"; New-avg {new[0]:.3f} vs {new[1]:.3f}")]
    if all(run.get("eval_off_domain") for name in names for run in runs_of(results, name)):
        english = [stats([run["eval_off_domain"]["languages"]["en"]["bpb"] for run in runs_of(results, name)]).mean
                   for name in names]  # fmt: skip
        verdicts.append(forgetting("English off the corpus's domain", *english, ours))
    return verdicts


def forgetting(what: str, base: float, finetuned: float, ours: float, system: str, detail: str = "") -> Verdict:
    """One reading of "dense fine-tuning forgets, LayerMoE does not" on one number (lower is better); `system` names
    the reference system, whose value is `ours`."""
    text = (
        f"- *Dense fine-tuning forgets, LayerMoE does not* ({what}): {base:.3f} (dense base) → {finetuned:.3f} after "
        f"full fine-tuning ({finetuned / base - 1:+.1%}) vs {ours:.3f} with {system} ({ours / base - 1:+.1%}){detail}"
    )
    claim = "dense fine-tuning forgets" + ("" if what == "Old-avg" else f" ({what})")
    if compare(finetuned, base) != "worse":
        text += " — full fine-tuning forgot nothing beyond the 1% margin: not testable here."
        return Verdict(claim, "not testable", text)
    ok = compare(ours, finetuned) == "better"
    return Verdict(claim, replicated(ok), text + " — " + ("replicated." if ok else "not replicated here."))


def lifelong_stats(results: dict[RunId, dict], preset: Preset, system: str) -> dict | None:
    """G0/G1/G2 means over seeds before (after G1) and after the G2 expansion, and the new experts in total."""
    groups = [preset.old, preset.new, preset.lifelong]
    before, after, experts = [], [], []
    for run, result in sorted(results.items()):
        if run.system != system or run.phase != Phase.G2:
            continue
        g1 = results[RunId(system, run.seed)]
        before.append(group_means({**g1["eval"]["languages"], **g1["eval_later"]["languages"]}, groups))
        after.append(group_means(result["eval"]["languages"], groups))
        experts.append(result["new_experts_total"])
    if not after:
        return None
    return {
        "seeds": len(after),
        "before": [stats([b[g] for b in before]) for g in range(3)],
        "after": [stats([a[g] for a in after]) for g in range(3)],
        "new_experts_total": experts[0],
    }


def lifelong_by_system(results: dict[RunId, dict], preset: Preset) -> dict[str, dict]:
    """`lifelong_stats` of every system that has lifelong runs."""
    entries = {system.name: lifelong_stats(results, preset, system.name) for system in preset.systems}
    return {name: entry for name, entry in entries.items() if entry is not None}


def lifelong_reading(by_system: dict[str, dict], preset: Preset) -> list[Verdict]:
    """The lifelong claims (from `lifelong_by_system`): earlier groups survive the next expansion, and LayerMoE is as
    good as uniform there."""
    verdicts = []
    for name, entry in by_system.items():
        before, after = entry["before"], entry["after"]
        ok = all(judge(after[g], before[g])[0] != "worse" for g in (0, 1))
        text = (
            f"- *Lifelong expansion keeps earlier groups* ({name}, {entry['seeds']} seed(s)): G0-avg "
            f"{before[0]} → {after[0]}, G1-avg {before[1]} → {after[1]}, G2-avg {before[2]} → {after[2]} — "
            + ("replicated." if ok else "not replicated here.")
        )
        verdicts.append(Verdict(f"lifelong keeps earlier groups ({name})", replicated(ok), text))
    lm, u = by_system.get(preset.reference), by_system.get(preset.baseline)
    if lm and u:
        judged = [judge(a, b)[0] for a, b in zip(lm["after"], u["after"], strict=True)]
        ok = "worse" not in judged
        text = (
            f"- *Lifelong, as good as uniform* ({preset.reference} {lm['new_experts_total']} new experts in total vs "
            f"{preset.baseline} {u['new_experts_total']}): G0/G1/G2-avg {'/'.join(str(s) for s in lm['after'])} vs "
            f"{'/'.join(str(s) for s in u['after'])} ({'/'.join(judged)}) — "
            + ("replicated." if ok else "not replicated here.")
        )
        verdicts.append(Verdict("lifelong as good as uniform", replicated(ok), text, {"groups": judged}))
    return verdicts


def profile_reading(profile: dict) -> tuple[list[str], dict]:
    """The layer profile's spread and shape: real models' are lower in the early and late layers, higher in the
    middle (the published Qwen1.5-1.8B and Llama-3.2-3B allocations give their first and last layers the most
    experts)."""
    scores = profile["layer_score"]
    third = max(1, len(scores) // 3)
    early, middle, late = scores[:third], scores[third : len(scores) - third], scores[len(scores) - third :]
    summary = {
        "layer_score": scores,
        "max": max(scores),
        "min": min(scores),
        "range": max(scores) - min(scores),
        "max_over_min": max(scores) / min(scores) if min(scores) > 0 else None,
        "early_mean": statistics.mean(early),
        "middle_mean": statistics.mean(middle) if middle else None,
        "late_mean": statistics.mean(late),
    }
    shape = (
        summary["middle_mean"] is not None
        and summary["middle_mean"] > summary["early_mean"]
        and summary["middle_mean"] > summary["late_mean"]
    )
    summary["middle_highest"] = shape
    ratio = f"{summary['max_over_min']:.2f}" if summary["max_over_min"] is not None else "undefined (a score ≤ 0)"
    lines = [
        f"T_i per layer: {', '.join(f'{s:.3f}' for s in scores)}.",
        f"Spread: max/min {ratio}, range {summary['range']:.3f}; mean of the first third {summary['early_mean']:.3f}, "
        f"middle {summary['middle_mean']:.3f}, last third {summary['late_mean']:.3f} — "
        + ("highest in the middle, the shape of real models' profiles." if shape
           else "not the shape of real models' profiles (highest in the middle)."),
    ]  # fmt: skip
    return lines, summary
