"""Experts per layer from layer similarity (LayerMoE Eq. 10) and the layers that get a language classifier.

Convention (the reference code's): N_i is the **total** expert count of layer i including the original FFN
(expert 0), the budget δ is Σ over layers of that total, and N_i = 1 keeps a layer dense. Because of the ceiling,
Σ N_i can exceed δ; both are reported, and `rounding="exact"` (largest remainder) hits δ instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.analysis.plots import plot_similarity
from layermoe_ds.analysis.similarity import layer_scores
from layermoe_ds.config import StrEnum, choice
from layermoe_ds.errors import InputError, OutputExistsError
from layermoe_ds.io import read_json, write_json

log = logging.getLogger(__name__)


class Method(StrEnum):
    LAYERMOE = "layermoe"  # Eq. 10: experts ∝ 1/T_i
    UNIFORM = "uniform"  # MoE-LPR: the same count in every layer
    RANDOM = "random"  # the budget spread at random
    # The premise test: the budget's new experts spread evenly over the `focus_layers` least (most) similar layers,
    # every other layer dense. Layer-wise allocation only makes sense if the least similar layers gain more.
    LEAST_SIMILAR = "least-similar"
    MOST_SIMILAR = "most-similar"


class Rounding(StrEnum):
    CEIL = "ceil"  # Eq. 10 as published: every layer's share rounded up, so Σ N_i can exceed the budget
    EXACT = "exact"  # largest remainder: Σ N_i = budget (within min/max experts and the alignment)


@dataclass(frozen=True)
class AllocationOptions:
    budget: int
    method: Method = Method.LAYERMOE
    # "K" (top-K by score), "last-K", an explicit list "5,6,10", "0" = none; None = the paper's K = 7, capped at the
    # number of layers (an explicit K larger than that is an error).
    classifier_layers: str | None = None
    min_experts: int = 1
    max_experts: int | None = None
    align: int = 1
    seed: int = 0
    # Eq. 10 needs T_i > 0. A model without the anisotropy of real LLMs (e.g. a tiny demo model) can have T_i ≤ 0;
    # only when this is set are such scores raised to it (recorded in the output); otherwise they are an error.
    min_score: float | None = None
    rounding: Rounding = Rounding.CEIL
    focus_layers: int | None = None  # least-similar / most-similar: how many layers get the new experts

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", choice(Method, self.method, "allocate.method"))
        object.__setattr__(self, "rounding", choice(Rounding, self.rounding, "allocate.rounding"))
        focused = self.method in (Method.LEAST_SIMILAR, Method.MOST_SIMILAR)
        if focused != (self.focus_layers is not None):
            raise InputError(f"allocate.focus_layers: {self.focus_layers} is given with, and only with, methods "
                             f"least-similar and most-similar (method is {self.method})")  # fmt: skip
        if focused and self.focus_layers < 1:
            raise InputError(f"allocate.focus_layers: {self.focus_layers} must be >= 1")
        if self.min_experts < 1:
            raise InputError(f"allocate.min_experts: {self.min_experts} must be >= 1 (1 = dense layer)")
        if self.max_experts is not None and self.max_experts < self.min_experts:
            raise InputError(f"allocate.max_experts: {self.max_experts} is smaller than min_experts {self.min_experts}")
        if self.align < 1:
            raise InputError(f"allocate.align: {self.align} must be >= 1")
        if self.min_score is not None and not self.min_score > 0:
            raise InputError(f"allocate.min_score: {self.min_score} must be > 0")


def scores_from_similarity(sim: dict, source: str = "similarity", allow_nonpositive: bool = False) -> list[float]:
    """T_i from a similarity document: `layer_score` when present, otherwise recomputed from `pairs`."""
    if not isinstance(sim, dict):
        raise InputError(f"{source}: expected a JSON object")
    if "layer_score" in sim:
        scores = sim["layer_score"]
    else:
        for key in ("pairs", "old", "new"):
            if key not in sim:
                raise InputError(f"{source}: has neither 'layer_score' nor '{key}' to compute it from")
        if not isinstance(sim["pairs"], dict) or not sim["pairs"]:
            raise InputError(f"{source}: 'pairs' must be a non-empty object of per-layer lists")
        lengths = {len(v) if isinstance(v, list) else -1 for v in sim["pairs"].values()}
        if len(lengths) != 1 or -1 in lengths:
            raise InputError(f"{source}: every entry of 'pairs' must be a list of one float per layer")
        scores, _ = layer_scores(sim["pairs"], sim["old"], sim["new"])
    if not isinstance(scores, list) or not scores or not all(isinstance(s, int | float) for s in scores):
        raise InputError(f"{source}: 'layer_score' must be a non-empty list of numbers")
    if "num_layers" in sim and sim["num_layers"] != len(scores):
        raise InputError(f"{source}: num_layers is {sim['num_layers']} but there are {len(scores)} layer scores")
    for i, score in enumerate(scores):
        if not math.isfinite(score) or (score <= 0 and not allow_nonpositive):
            raise InputError(
                f"{source}: layer {i} has score {score}; Eq. 10 needs positive similarities "
                "(was the model or data degenerate? --min-score raises such scores explicitly)"
            )
    return [float(s) for s in scores]


def layermoe_counts(scores: Sequence[float], budget: int) -> list[int]:
    """Eq. 10: N_i = ceil( (1/T_i) / Σ_j (1/T_j) × δ )."""
    inverse = [1.0 / s for s in scores]
    total = sum(inverse)
    # A share that lands on an integer up to float error (e.g. 3.0000000000000004) must not round up.
    return [max(1, math.ceil(round(inv / total * budget, 9))) for inv in inverse]


def exact_counts(shares: Sequence[float], budget: int, low: int, high: int | None, align: int) -> list[int]:
    """Integer N_i near the real `shares` with Σ N_i = `budget` (largest remainder), low ≤ N_i ≤ high, and each
    layer's new experts (N_i − 1) a multiple of `align`. Works in units of `align` new experts; where the bounds or
    the alignment make the budget unreachable, the nearest reachable total below (or above) it."""
    lo = math.ceil((low - 1) / align)
    hi = None if high is None else max(lo, (high - 1) // align)  # the alignment wins, as in `align_counts`
    unit_shares = [max(share - 1, 0.0) / align for share in shares]
    units = [max(lo, math.floor(round(u, 9))) if hi is None else min(max(lo, math.floor(round(u, 9))), hi)
             for u in unit_shares]  # fmt: skip
    left = (budget - len(shares)) // align - sum(units)
    while left:
        grow = left > 0
        movable = [i for i, n in enumerate(units) if (hi is None or n < hi) if grow] or [
            i for i, n in enumerate(units) if n > lo and not grow
        ]
        if not movable:
            break
        # The largest remainder gains a unit; when the floor of `low` overshot, the smallest remainder loses one.
        pick = (
            max(movable, key=lambda i: (unit_shares[i] - units[i], -i))
            if grow
            else min(movable, key=lambda i: (unit_shares[i] - units[i], i))
        )
        units[pick] += 1 if grow else -1
        left += -1 if grow else 1
    return [1 + n * align for n in units]


def focused_counts(scores: Sequence[float], budget: int, layers: int, most: bool) -> list[int]:
    """The budget's new experts spread evenly over the `layers` least (`most`) similar layers (ties: lower index),
    the extra ones to the most extreme of them; every other layer dense."""
    if layers > len(scores):
        raise InputError(f"allocate.focus_layers: {layers} is larger than the number of layers ({len(scores)})")
    new = budget - len(scores)
    if new < layers:
        raise InputError(f"allocate.budget: {budget} gives {new} new experts, fewer than focus_layers ({layers})")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i] if most else scores[i], i))[:layers]
    counts = [1] * len(scores)
    for rank, i in enumerate(ranked):
        counts[i] += new // layers + (1 if rank < new % layers else 0)
    return counts


def random_counts(num_layers: int, total: int, low: int, high: int | None, seed: int) -> list[int]:
    """Seeded random allocation with a given Σ N_i: start every layer at `low`, add experts to random layers."""
    counts = [low] * num_layers
    rng = random.Random(seed)
    for _ in range(total - low * num_layers):
        open_layers = [i for i, n in enumerate(counts) if high is None or n < high]
        counts[rng.choice(open_layers)] += 1
    return counts


def align_counts(counts: Sequence[int], align: int) -> list[int]:
    """Round each layer's *new* experts (N_i − 1) up to a multiple of `align`: expert 0 stays local on every
    rank, only new experts are sharded across the expert-parallel group. Dense layers stay dense."""
    return [n if n == 1 else 1 + math.ceil((n - 1) / align) * align for n in counts]


PAPER_CLASSIFIER_LAYERS = 7


def classifier_layers(spec: str | None, scores: Sequence[float], counts: Sequence[int] | None = None) -> list[int]:
    """`K` → the K highest-scoring layers (ties: lower index), `last-K` → the K last layers, or an explicit comma
    list; sorted. With the layers' expert `counts`, `K` and `last-K` take only layers with new experts (where a
    classifier has routes to steer), and a list naming a single-expert layer is an error that names it."""
    num_layers = len(scores)
    routed = [i for i in range(num_layers) if counts is None or counts[i] > 1]
    if spec is None:
        spec = str(min(PAPER_CLASSIFIER_LAYERS, len(routed)))
    spec = str(spec).strip()
    if spec.startswith("last-"):
        k = _parse_k(spec[5:], spec, num_layers)
        _enough_routed(k, routed)
        return routed[len(routed) - k :]
    if "," in spec or not spec.isdigit():
        try:
            layers = sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError as exc:
            raise InputError(f"classifier_layers: {spec!r} is not K, last-K or a list like 5,6,10") from exc
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise InputError(f"classifier_layers: layers {bad} are outside 0..{num_layers - 1}")
        return _on_routed_layers(layers, routed, spec)
    k = _parse_k(spec, spec, num_layers)
    _enough_routed(k, routed)
    ranked = sorted(routed, key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def _on_routed_layers(layers: list[int], routed: list[int], spec: str) -> list[int]:
    dense = sorted(set(layers) - set(routed))
    if dense:
        raise InputError(
            f"classifier_layers: {spec!r} names layers {dense}, which keep a single expert (N_i = 1): a classifier "
            "there has no route to steer; name layers with new experts, or give K to take the most similar of them"
        )
    return layers


def _enough_routed(k: int, routed: list[int]) -> None:
    if k > len(routed):
        raise InputError(f"classifier_layers: K = {k}, but only {len(routed)} layers have new experts: {routed}")


def _parse_k(text: str, spec: str, num_layers: int) -> int:
    if not text.isdigit():
        raise InputError(f"classifier_layers: {spec!r} is not K, last-K or a list like 5,6,10")
    k = int(text)
    if k > num_layers:
        raise InputError(f"classifier_layers: K = {k} is larger than the number of layers ({num_layers})")
    return k


def allocate(scores: Sequence[float], options: AllocationOptions) -> dict:
    """Per-layer expert counts and classifier layers for `scores` under `options` (without source metadata)."""
    num_layers = len(scores)
    if options.budget < num_layers:
        raise InputError(
            f"allocate.budget: {options.budget} is smaller than the number of layers ({num_layers}); "
            "the budget counts every layer's original FFN too"
        )
    high, low = options.max_experts, options.min_experts
    floored = [i for i, score in enumerate(scores) if options.min_score is not None and score < options.min_score]
    raw_scores = list(scores)
    if floored:
        scores = [max(score, options.min_score) for score in scores]
    bad = [i for i, score in enumerate(scores) if not score > 0]
    if bad:
        raise InputError(f"allocate: layers {bad} have non-positive scores; Eq. 10 needs T_i > 0 (see --min-score)")

    def clamp(counts):
        return [min(max(n, low), high) if high is not None else max(n, low) for n in counts]

    if options.rounding == Rounding.EXACT:
        inverse = [1.0 / s for s in scores]
        shares = [inv / sum(inverse) * options.budget for inv in inverse]
        layermoe = exact_counts(shares, options.budget, low, high, options.align)
    else:
        layermoe = clamp(layermoe_counts(scores, options.budget))
    if options.method == Method.LAYERMOE:
        counts = layermoe
    elif options.method in (Method.LEAST_SIMILAR, Method.MOST_SIMILAR):
        counts = focused_counts(scores, options.budget, options.focus_layers, options.method == Method.MOST_SIMILAR)
    elif options.method == Method.UNIFORM:
        counts = clamp([options.budget // num_layers] * num_layers)
    else:
        counts = random_counts(num_layers, sum(layermoe), low, high, options.seed)
    aligned = align_counts(counts, options.align)
    result = {
        "method": options.method,
        "budget": options.budget,
        "rounding": options.rounding,
        "experts_per_layer": aligned,
        "total_experts": sum(aligned),
        "new_experts": sum(n - 1 for n in aligned),
        "classifier_layers": classifier_layers(options.classifier_layers, scores, aligned),
        "classifier_spec": options.classifier_layers or f"default ({PAPER_CLASSIFIER_LAYERS}, capped at layers)",
        "layer_score": list(scores),
        "seed": options.seed,
        "min_experts": low,
        "max_experts": high,
        "align": options.align,
    }
    if floored:
        result.update(min_score=options.min_score, floored_layers=floored, raw_layer_score=raw_scores)
    passed_over = sorted(set(classifier_layers(options.classifier_layers, scores)) - set(result["classifier_layers"]))
    if passed_over:  # Eq. 10 left some of the named layers dense: the next ones with new experts instead
        result["classifier_passed_over_dense"] = passed_over
    if options.method in (Method.LEAST_SIMILAR, Method.MOST_SIMILAR):
        result["focus_layers"] = options.focus_layers
    if options.align > 1:
        result["align_extra_experts"] = sum(aligned) - sum(counts)
        result["experts_per_layer_unaligned"] = counts
    return result


def allocate_from_file(similarity_path: Path, options: AllocationOptions) -> dict:
    sim = read_json(similarity_path, "similarity")
    scores = scores_from_similarity(sim, f"similarity file {similarity_path}", options.min_score is not None)
    result = allocate(scores, options)
    result["source"] = {
        "similarity": str(similarity_path),
        "sha256": hashlib.sha256(Path(similarity_path).read_bytes()).hexdigest(),
        "model": sim.get("model"),
        "old": sim.get("old"),
        "new": sim.get("new"),
    }
    return result


def sweep_table(scores: Sequence[float], budgets: Sequence[int], options: AllocationOptions) -> str:
    """Allocations for several budgets side by side: one row per layer, one column per budget."""
    results = [allocate(scores, AllocationOptions(**{**options.__dict__, "budget": b})) for b in budgets]
    header = f"{'layer':>5} {'T_i':>7} " + " ".join(f"{'δ=' + str(b):>7}" for b in budgets)
    lines = [header]
    for i, score in enumerate(scores):
        marks = " ".join(
            f"{r['experts_per_layer'][i]:>6}{'*' if i in r['classifier_layers'] else ' '}" for r in results
        )
        lines.append(f"{i:>5} {score:>7.4f} {marks}")
    lines.append(f"{'Σ N_i':>13} " + " ".join(f"{r['total_experts']:>7}" for r in results))
    lines.append(f"{'new':>13} " + " ".join(f"{r['new_experts']:>7}" for r in results))
    lines.append("* = classifier layer")
    return "\n".join(lines)


def sweep_file(similarity_path: Path, budgets: Sequence[int], options: AllocationOptions) -> str:
    """`sweep_table` for the scores of a similarity.json."""
    sim = read_json(similarity_path, "similarity")
    scores = scores_from_similarity(sim, f"similarity file {similarity_path}", options.min_score is not None)
    return sweep_table(scores, budgets, options)


def parse_budgets(text: str, what: str = "budgets") -> list[int]:
    """ "36,72,108" → [36, 72, 108]; anything else is an error naming `what`."""
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets:
        raise InputError(f"{what}: {text!r} is not a list of integers like 36,72,108")
    return budgets


def write_allocation(similarity_path: Path, options: AllocationOptions, out: Path, plot: Path | None = None) -> dict:
    """Allocate from a similarity.json into `out` (refusing an `out` made from another similarity file), with the
    scores-and-bars plot when `plot` is given."""
    out = Path(out)
    if out.exists():
        existing = read_json(out, "allocation")
        if existing.get("source", {}).get("similarity") not in (None, str(similarity_path)):
            raise OutputExistsError(f"allocate: {out} was made from another similarity file; choose another --out")
    result = allocate_from_file(similarity_path, options)
    write_json(out, result)
    if plot:
        plot_similarity(read_json(similarity_path, "similarity"), plot, result)
    return result


def describe(result: dict) -> str:
    """What `layermoe allocate` prints: floored scores, the counts, and the totals."""
    lines = []
    if result.get("floored_layers"):
        raw = [round(result["raw_layer_score"][i], 4) for i in result["floored_layers"]]
        lines.append(
            f"note: layers {result['floored_layers']} had scores below --min-score {result['min_score']} ({raw}) "
            "and were raised to it"
        )
    lines.append(",".join(map(str, result["experts_per_layer"])))
    rounding = Rounding(result.get("rounding", Rounding.CEIL))
    rule = {Rounding.CEIL: "every layer rounded up (Eq. 10 as published)", Rounding.EXACT: "largest remainder"}
    rounded = f"; rounding {rounding}: {rule[rounding]}" if result["method"] in (Method.LAYERMOE, Method.RANDOM) else ""
    lines.append(
        f"{result['method']}: Σ N_i = {result['total_experts']} for budget {result['budget']} "
        f"({result['new_experts']} new experts{rounded}), classifier layers {result['classifier_layers']}"
        + (f", alignment added {result['align_extra_experts']}" if "align_extra_experts" in result else "")
    )
    if result.get("classifier_passed_over_dense"):
        lines.append(
            f"note: layers {result['classifier_passed_over_dense']} would get classifiers but keep a single expert; "
            "the next layers with new experts have them instead"
        )
    return "\n".join(lines)
