"""The budget–quality curve: New-avg against new experts for each allocation method, and how many experts uniform
MoE-LPR needs for each point's quality (interpolated along uniform's curve, never extrapolated) — the paper's
headline, "fewer experts, same quality", read from the numbers, with a bootstrap interval over seeds."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, replace

from layermoe_testbed.experiment.presets import Preset, RunId, SystemMethod
from layermoe_testbed.experiment.reading import (
    RELATIVE_TOLERANCE,
    VERDICT_WORDS,
    Stats,
    Verdict,
    average,
    judge,
    pooled_sd,
    runs_of,
    seed_stats,
)

BOOTSTRAP_DRAWS = 10_000
SLOPE_SDS = 3.0  # uniform's curve must fall by this many pooled seed sds from its smallest budget to its largest
PAPER_SAVING = 0.6  # the paper's headline: better than MoE-LPR "with 60% fewer experts" in one expansion


@dataclass(frozen=True)
class CurvePoint:
    system: str
    method: SystemMethod
    budget_per_layer: float
    new_experts: int
    params_total: int
    params_active: int
    new: Stats
    old: Stats
    new_stage1: Stats | None = None  # after stage 1 (None for a system without stage 2)
    old_stage1: Stats | None = None
    new_values: tuple[float, ...] = ()  # the final New-avg of each seed (the headline's bootstrap resamples them)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("system", "budget_per_layer", "new_experts")}
        out.update(method=str(self.method), params_total=self.params_total, params_active=self.params_active)
        out.update(new_avg=self.new.as_dict(), old_avg=self.old.as_dict())
        for key, value in (("new_avg_stage1", self.new_stage1), ("old_avg_stage1", self.old_stage1)):
            if value is not None:
                out[key] = value.as_dict()
        return out


def curve(results: dict[RunId, dict], preset: Preset) -> dict[SystemMethod, list[CurvePoint]]:
    """Each method's measured points, by new experts (seed means where a point has several seeds)."""
    points: dict[SystemMethod, list[CurvePoint]] = {}
    for system in preset.systems:
        runs = runs_of(results, system.name)
        if not (system.curve and runs):
            continue
        first = runs[0]
        point = CurvePoint(
            system.name,
            system.method,
            system.budget_per_layer,
            first["allocation"]["new_experts"],
            first["eval"]["params_total"],
            first["eval"]["params_active"],
            seed_stats(results, system.name, "new"),
            seed_stats(results, system.name, "old"),
            seed_stats(results, system.name, "new", "eval_stage1"),
            seed_stats(results, system.name, "old", "eval_stage1"),
            tuple(average(r["eval"], "new") for r in runs),
        )
        points.setdefault(system.method, []).append(point)
    return {method: sorted(p, key=lambda p: p.new_experts) for method, p in points.items()}


def experts_for_quality(points: list[CurvePoint], target: float) -> float | None:
    """New experts a method needs for a New-avg of `target`, linearly interpolated between its measured points
    (the fewest such on a non-monotone curve); None when `target` is outside what its points reach."""
    for a, b in zip(points, points[1:], strict=False):
        low, high = sorted((a.new.mean, b.new.mean))
        if low <= target <= high and a.new.mean != b.new.mean:
            share = (a.new.mean - target) / (a.new.mean - b.new.mean)
            return a.new_experts + share * (b.new_experts - a.new_experts)
    exact = [p.new_experts for p in points if p.new.mean == target]
    return float(min(exact)) if exact else None


def curve_reading(
    points: dict[SystemMethod, list[CurvePoint]], reference: str = ""
) -> tuple[list[Verdict], list[dict]]:
    """At equal New-avg, how many fewer new experts LayerMoE (and random allocation) need than uniform MoE-LPR; at
    the `reference` LayerMoE point, with a bootstrap interval (the headline); whether uniform's curve has a slope to
    read savings from; LayerMoE against random at equal totals. (verdicts, one saving record per LayerMoE and random
    point)."""
    uniform = points.get(SystemMethod.UNIFORM, [])
    if len(uniform) < 2:
        return [], []
    verdicts, savings = [], []
    intervals: dict[str, tuple[float, float]] = {}  # each point's bootstrap interval, drawn once
    first, last = uniform[0], uniform[-1]
    span = f"{first.new.mean:.3f} at {first.new_experts} … {last.new.mean:.3f} at {last.new_experts}"
    for method in (SystemMethod.LAYERMOE, SystemMethod.RANDOM):
        for point in points.get(method, []):
            entry = {"system": point.system, "method": str(method), "new_experts": point.new_experts}
            entry.update(new_avg=point.new.mean, **uniform_equivalent(uniform, point))
            low, high = intervals[point.system] = saving_interval(uniform, point)
            entry.update(interval=[None if math.isinf(end) else end for end in (low, high)])
            entry.update(interval_open=[math.isinf(low), math.isinf(high)])
            entry.update(verdict=saving_verdict(low, high, entry))
            savings.append(entry)
            text = (
                f"- *Budget–quality curve* ({point.system}, {point.new_experts} new experts, New-avg "
                f"{point.new.mean:.3f}): {entry['reading']}; {interval_text(point, uniform, low, high)} (uniform's "
                f"curve: {span})."
            )
            verdicts.append(Verdict(f"curve point ({point.system})", entry["note"], text))
    verdicts.append(curve_slope(uniform))
    headline = next((p for p in points.get(SystemMethod.LAYERMOE, []) if p.system == reference), None)
    if headline is not None:  # its interval was drawn above, with the same seeded bootstrap
        verdicts.append(headline_verdict(uniform, headline, intervals[headline.system]))
        verdicts.append(paper_size_verdict(verdicts[-1]))
    random_points = {p.new_experts: p for p in points.get(SystemMethod.RANDOM, [])}
    for point in points.get(SystemMethod.LAYERMOE, []):
        other = random_points.get(point.new_experts)
        if other:
            verdict, how = judge(point.new, other.new)
            text = (
                f"- *Similarity beats random at {point.new_experts} new experts*: New-avg {point.new} (LayerMoE) vs "
                f"{other.new} (random; {how}) — " + VERDICT_WORDS[verdict]
            )
            verdicts.append(Verdict(f"similarity beats random at {point.new_experts}", verdict, text))
    return verdicts, savings


def curve_slope(uniform: list[CurvePoint]) -> Verdict:
    """Whether more experts buy uniform measurable quality: its New-avg gain from the smallest budget to the largest
    against the seed sd pooled over its points (≥ SLOPE_SDS sds), or, with one seed per point, against 1%."""
    first, last = uniform[0], uniform[-1]
    gain = first.new.mean - last.new.mean
    pooled = pooled_sd([p.new for p in uniform])
    if pooled > 0:
        ok, measure = gain >= SLOPE_SDS * pooled, f"{gain / pooled:.1f} times its pooled seed sd ({pooled:.4f})"
    else:
        ok, measure = gain > RELATIVE_TOLERANCE * first.new.mean, "one seed per point: against a 1% margin"
    text = (
        f"- *A curve to save experts along*: uniform MoE-LPR's New-avg improves by {gain:+.3f} bits/byte from "
        f"{first.new_experts} to {last.new_experts} new experts, {measure} — "
        + (f"a slope (≥ {SLOPE_SDS:g} sds)." if ok else "flat within the noise: savings read off it mean little.")
    )
    numbers = {"gain": gain, "pooled_sd": pooled, "gain_over_sd": gain / pooled if pooled > 0 else None}
    return Verdict("a curve to save experts along", "replicated" if ok else "not testable", text, numbers)


def saving_bounds(uniform: list[CurvePoint], point: CurvePoint, target: float) -> tuple[float, float]:
    """What uniform's measured points say of the saving at a New-avg of `target`: equal ends where uniform's curve
    reaches `target` (interpolated); outside it, one bound: better than every uniform point means uniform needs more
    than its best point's experts (the saving is above 1 − n/best, open upward); worse than every uniform point, fewer
    than its smallest budget's (below 1 − n/smallest, open downward). A bound's sign is the saving's only where it
    excludes zero: a point with fewer experts than uniform's smallest, and worse, may save experts or not."""
    needed = experts_for_quality(uniform, target)
    if needed is not None:
        saving = 1 - point.new_experts / needed
        return saving, saving
    best = min(uniform, key=lambda p: p.new.mean)
    if target < best.new.mean:
        return 1 - point.new_experts / best.new_experts, math.inf
    return -math.inf, 1 - point.new_experts / uniform[0].new_experts


def saving_interval(
    uniform: list[CurvePoint], point: CurvePoint, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile interval of `point`'s saving against uniform, from a bootstrap over seeds: each draw
    resamples every point's seeds with replacement and reads the saving's bounds again (`saving_bounds`); the
    interval runs from the 2.5th percentile of the lower bounds to the 97.5th of the upper ones, so a draw outside
    uniform's curve widens it by what that draw cannot tell. An infinite end is an open one."""
    rng = random.Random(seed)

    def draw(p: CurvePoint) -> float:
        values = p.new_values or (p.new.mean,)
        return statistics.fmean(rng.choices(values, k=len(values)))

    lows, highs = [], []
    for _ in range(draws):
        curve_draw = [replace(p, new=Stats(draw(p), 0.0, 1)) for p in uniform]
        low, high = saving_bounds(curve_draw, point, draw(point))
        lows.append(low)
        highs.append(high)
    lows.sort()
    highs.sort()
    return lows[round(0.025 * (draws - 1))], highs[round(0.975 * (draws - 1))]


def _percent(value: float) -> str:
    return "+∞" if value == math.inf else ("−∞" if value == -math.inf else f"{value:.0%}".replace("-", "−"))


def interval_text(point: CurvePoint, uniform: list[CurvePoint], low: float, high: float) -> str:
    seeds = f"{point.new.n} seed{'s' * (point.new.n != 1)}; uniform {'/'.join(str(p.new.n) for p in uniform)}"
    draws = f"{BOOTSTRAP_DRAWS:,} draws"
    return f"95% interval {_percent(low)} to {_percent(high)}, a bootstrap over seeds ({seeds}), {draws}"


def saving_verdict(low: float, high: float, equivalent: dict) -> str:
    """Fewer experts ("replicated") when the whole interval saves, more ("not replicated") when none of it does;
    otherwise "matched" (no saving beyond the noise) where uniform's curve reaches the point, "not testable" where
    it does not (the point lies outside uniform's measured budgets, and its bound cannot sign the saving). A bound
    is strict: worse than uniform's smallest point at as many experts is more experts."""
    if low > 0 or (low == 0 and equivalent["note"] == "better than every uniform point"):
        return "replicated"
    if high < 0 or (high == 0 and equivalent["note"] == "worse than every uniform point"):
        return "not replicated"
    return "matched" if equivalent["note"] == "interpolated" else "not testable"


SAVING_WORDS = {
    "replicated": "fewer experts, replicated.",
    "not replicated": "more experts: not replicated here.",
    "matched": "the interval includes no saving: not significant here.",
    "not testable": "outside uniform's measured curve, and its bound includes no saving either way: not testable here.",
}


def headline_verdict(
    uniform: list[CurvePoint], point: CurvePoint, interval: tuple[float, float] | None = None
) -> Verdict:
    """The paper's headline at the reference point: the saving against uniform at equal New-avg, with its interval
    (`saving_interval`'s, unless already drawn)."""
    equivalent = uniform_equivalent(uniform, point)
    low, high = interval or saving_interval(uniform, point)
    verdict = saving_verdict(low, high, equivalent)
    text = (
        f"- *Fewer experts for the same quality* (the paper: 60% fewer in one expansion): {point.system} "
        f"({point.new_experts} new experts, New-avg {point.new}) — {equivalent['reading']}; "
        f"{interval_text(point, uniform, low, high)} — " + SAVING_WORDS[verdict]
    )
    numbers = {
        "saving": equivalent["saving"],
        # strict JSON: an open end (±inf) is null, and which end is open is said
        "interval": [None if math.isinf(end) else end for end in (low, high)],
        "interval_open": [math.isinf(low), math.isinf(high)],
        "uniform_experts": equivalent["uniform_experts"],
    }
    return Verdict("fewer experts for the same quality", verdict, text, numbers)


def paper_size_verdict(headline: Verdict) -> Verdict:
    """Whether the headline's interval holds the paper's size of saving (60% fewer): a question of its own, which a
    point outside uniform's curve can answer when the sign of its saving cannot (worse than uniform's smallest budget
    with fewer experts bounds the saving above)."""
    low, high = (
        (-math.inf, math.inf)[i] if headline.numbers["interval_open"][i] else headline.numbers["interval"][i]
        for i in (0, 1)
    )
    if high < PAPER_SAVING:
        verdict, words = "not replicated", "lies below it — not replicated at the paper's size."
    elif low >= PAPER_SAVING:
        verdict, words = "replicated", "lies at or above it — replicated."
    else:
        verdict, words = "matched", "holds it: consistent with it, not a test of it."
    text = (
        f"- *The paper's size of saving* ({_percent(PAPER_SAVING)} fewer new experts at equal New-avg): the "
        f"headline's interval, {_percent(low)} to {_percent(high)}, {words}"
    )
    numbers = {"paper_saving": PAPER_SAVING, "interval": headline.numbers["interval"]}
    return Verdict("the paper's size of saving", verdict, text, numbers)


def uniform_equivalent(uniform: list[CurvePoint], point: CurvePoint) -> dict:
    """The new experts uniform needs for `point`'s New-avg, the saving, and how to read it."""
    needed = experts_for_quality(uniform, point.new.mean)
    if needed is not None:
        saving = 1 - point.new_experts / needed
        change = f"{saving:.0%} fewer" if saving >= 0 else f"{-saving:.0%} more"
        reading = f"uniform needs {needed:.1f} for the same New-avg: {change} with {point.method}"
        return {"uniform_experts": needed, "saving": saving, "note": "interpolated", "reading": reading}
    best = min(uniform, key=lambda p: p.new.mean)
    if point.new.mean < best.new.mean:
        bound = 1 - point.new_experts / best.new_experts
        reading = f"better than uniform's best ({best.new.mean:.3f} with {best.new_experts})" + (
            f": at least {bound:.0%} fewer" if bound >= 0 else f", with {-bound:.0%} more experts than it"
        )
        return {"uniform_experts": None, "saving": None, "note": "better than every uniform point", "reading": reading}
    first = uniform[0]
    bound = 1 - point.new_experts / first.new_experts
    reading = f"worse than uniform's smallest point ({first.new.mean:.3f} with {first.new_experts})" + (
        f", with {-bound:.0%} more experts: at least that many more"
        if bound < 0
        else f" with fewer experts: uniform's curve does not reach below {first.new_experts}"
    )
    return {"uniform_experts": None, "saving": None, "note": "worse than every uniform point", "reading": reading}


# --- the claims --------------------------------------------------------------------------------------------------
