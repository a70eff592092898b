import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layermoe_ds.analysis.allocation import (
    AllocationOptions,
    align_counts,
    allocate,
    allocate_from_file,
    classifier_layers,
    describe,
    layermoe_counts,
    random_counts,
    scores_from_similarity,
    sweep_table,
)
from layermoe_ds.cli import main

# LayerMoE paper, Llama-3.2-3B, G1 (el, hu, tr over en, zh, es), budget 70: Σ N_i = 84.
LLAMA_G1 = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]


def similarity_file_for(target: list[int], path, budget: int, with_score: bool) -> None:
    """Per-pair curves whose Eq. 9 average gives 1/T_i ∝ N_i − ½, so Eq. 10's ceiling lands exactly on `target`.

    With Σ (N_i − ½) = budget (true for the Llama list: 84 − 28/2 = 70), share_i × δ = N_i − ½.
    """
    assert sum(n - 0.5 for n in target) == budget
    scores = [1.0 / (n - 0.5) for n in target]
    new, old = ["el", "hu", "tr"], ["en", "zh", "es"]
    pairs = {}
    # new–new pairs average to T_i + d, new–old pairs to T_i − d: the ½(nn + no) average is T_i.
    for k, (a, b) in enumerate([("el", "hu"), ("el", "tr"), ("hu", "tr")]):
        pairs[f"{a}&{b}"] = [s + 0.05 + 0.01 * (k - 1) for s in scores]
    for k, (a, b) in enumerate([(a, b) for a in new for b in old]):
        pairs[f"{a}&{b}"] = [s - 0.05 + 0.002 * (k - 4) for s in scores]
    sim = {"model": "fake", "num_layers": len(target), "old": old, "new": new, "tokens": {}, "pairs": pairs, "seed": 0}
    if with_score:
        sim["layer_score"] = scores
    path.write_text(json.dumps(sim))


@pytest.mark.parametrize("with_score", [True, False])
def test_reproduces_the_published_28_layer_allocation(tmp_path, with_score):
    path = tmp_path / "sim.json"
    similarity_file_for(LLAMA_G1, path, 70, with_score)
    result = allocate_from_file(path, AllocationOptions(budget=70))
    assert result["experts_per_layer"] == LLAMA_G1
    assert result["total_experts"] == 84 and result["new_experts"] == 56 and result["budget"] == 70
    assert result["source"]["sha256"] and result["method"] == "layermoe"


def test_eq10_by_hand():
    # 1/T = 2, 1, 1 → shares ½, ¼, ¼ of δ = 8 → 4, 2, 2
    assert layermoe_counts([0.5, 1.0, 1.0], 8) == [4, 2, 2]
    # shares × δ = 2.4, 1.2, 1.2 → ceil → 3, 2, 2 (Σ 7 > δ 6: the ceiling overshoots, as in the paper)
    assert layermoe_counts([0.5, 1.0, 1.0], 6) == [3, 2, 2]
    # an integer share up to float error does not round up
    assert layermoe_counts([0.1] * 10, 30) == [3] * 10


def test_uniform_random_min_max_align():
    scores = [0.9, 0.5, 0.4, 0.3, 0.35, 0.6]
    uniform = allocate(scores, AllocationOptions(budget=18, method="uniform"))
    assert uniform["experts_per_layer"] == [3] * 6
    layermoe = allocate(scores, AllocationOptions(budget=18))
    rand = allocate(scores, AllocationOptions(budget=18, method="random", seed=3))
    assert rand["total_experts"] == layermoe["total_experts"] and min(rand["experts_per_layer"]) >= 1
    assert rand == allocate(scores, AllocationOptions(budget=18, method="random", seed=3))
    assert (
        rand["experts_per_layer"]
        != allocate(scores, AllocationOptions(budget=18, method="random", seed=4))["experts_per_layer"]
    )
    capped = allocate(scores, AllocationOptions(budget=30, min_experts=2, max_experts=5))
    assert min(capped["experts_per_layer"]) >= 2 and max(capped["experts_per_layer"]) <= 5
    spread = random_counts(4, 10, 2, 3, seed=0)
    assert sum(spread) == 10 and sorted(spread) == [2, 2, 3, 3]
    assert align_counts([1, 2, 3, 4, 6], 2) == [1, 3, 3, 5, 7]
    aligned = allocate(scores, AllocationOptions(budget=18, align=2))
    assert all(n == 1 or (n - 1) % 2 == 0 for n in aligned["experts_per_layer"])
    assert aligned["align_extra_experts"] == aligned["total_experts"] - sum(aligned["experts_per_layer_unaligned"])


def test_classifier_layer_choices():
    scores = [0.2, 0.5, 0.5, 0.1, 0.4]
    assert classifier_layers("2", scores) == [1, 2]
    assert classifier_layers("3", [0.3, 0.3, 0.3, 0.3]) == [0, 1, 2]  # ties: lower index first
    assert classifier_layers("last-2", scores) == [3, 4]
    assert classifier_layers("4,0", scores) == [0, 4]
    assert classifier_layers("0", scores) == []
    with pytest.raises(ValueError, match="K = 6 is larger than the number of layers"):
        classifier_layers("6", scores)
    with pytest.raises(ValueError, match=r"layers \[7\] are outside 0..4"):
        classifier_layers("1,7", scores)
    with pytest.raises(ValueError, match="not K, last-K or a list"):
        classifier_layers("top", scores)


def test_classifiers_pass_over_single_expert_layers():
    # The most similar layers get the fewest experts; with min_experts=1 they can end up dense, where a classifier
    # has no route to steer: K takes the next most similar layers with new experts, and says which it passed over.
    scores = [0.05, 0.9, 0.8]
    result = allocate(scores, AllocationOptions(budget=5, classifier_layers="1", max_experts=3))
    assert result["experts_per_layer"] == [3, 1, 1]
    assert result["classifier_layers"] == [0] and result["classifier_passed_over_dense"] == [1]
    assert allocate(scores, AllocationOptions(budget=5, max_experts=3))["classifier_layers"] == [0]  # default K
    with pytest.raises(ValueError, match=r"classifier_layers: '1,2' names layers \[1, 2\], which keep a single"):
        allocate(scores, AllocationOptions(budget=5, classifier_layers="1,2", max_experts=3))  # explicit: an error
    last = allocate(scores, AllocationOptions(budget=5, classifier_layers="last-1", max_experts=3))
    assert last["classifier_layers"] == [0] and last["classifier_passed_over_dense"] == [2]  # the last with experts
    assert classifier_layers("last-2", [0.1, 0.2, 0.3, 0.4], [3, 2, 2, 1]) == [1, 2]
    with pytest.raises(ValueError, match=r"K = 2, but only 1 layers have new experts: \[0\]"):
        allocate(scores, AllocationOptions(budget=5, classifier_layers="2", max_experts=3))
    ok = allocate(scores, AllocationOptions(budget=6, classifier_layers="1", min_experts=2))
    assert ok["classifier_layers"] == [1] and "classifier_passed_over_dense" not in ok


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="budget: 3 is smaller than the number of layers"):
        allocate([0.5] * 4, AllocationOptions(budget=3))
    with pytest.raises(ValueError, match="layer 1 has score -0.2"):
        scores_from_similarity({"layer_score": [0.3, -0.2]})
    with pytest.raises(ValueError, match="layer 0 has score nan"):
        scores_from_similarity({"layer_score": [math.nan]})
    with pytest.raises(ValueError, match="neither 'layer_score' nor 'pairs'"):
        scores_from_similarity({"old": ["en"], "new": ["ru"]})
    with pytest.raises(ValueError, match="num_layers is 3 but there are 2"):
        scores_from_similarity({"layer_score": [0.3, 0.2], "num_layers": 3})
    with pytest.raises(ValueError, match="method"):
        AllocationOptions(budget=4, method="greedy")


def test_sweep_prints_budgets_side_by_side():
    table = sweep_table([0.5, 0.25, 0.5], [3, 6, 12], AllocationOptions(budget=3, classifier_layers="1"))
    lines = table.splitlines()
    assert "δ=3" in lines[0] and "δ=12" in lines[0]
    # 1/T = 2, 4, 2 → shares ¼, ½, ¼; the classifier goes to the most similar layer (0, the tie's lower index)
    # unless it keeps a single expert (δ=3): then to the most similar layer with new experts (1)
    assert lines[1].split() == ["0", "0.5000", "1", "2*", "3*"]
    assert lines[2].split() == ["1", "0.2500", "2*", "3", "6"]


def test_allocate_command(tmp_path, capsys):
    sim = tmp_path / "sim.json"
    similarity_file_for(LLAMA_G1, sim, 70, with_score=True)
    out = tmp_path / "alloc.json"
    argv = ["allocate", "--similarity", str(sim), "--budget", "70", "--out", str(out), "--classifier-layers", "7"]
    assert main([*argv, "--plot", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ",".join(map(str, LLAMA_G1))
    result = json.loads(out.read_text())
    assert (
        result["classifier_layers"] == sorted(range(28), key=lambda i: (LLAMA_G1[i], i))[:7]
        and (tmp_path / "a.png").stat().st_size > 10_000
    )
    assert main(["allocate", "--similarity", str(sim), "--sweep", "36,72,108"]) == 0
    assert "δ=108" in capsys.readouterr().out
    assert main(["allocate", "--similarity", str(sim), "--budget", "20", "--out", str(tmp_path / "x.json")]) == 2
    assert "budget: 20 is smaller than the number of layers (28)" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["allocate", "--similarity", str(bad), "--budget", "70", "--out", str(tmp_path / "y.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_min_score_raises_nonpositive_scores_explicitly(tmp_path, capsys):
    with pytest.raises(ValueError, match="non-positive"):
        allocate([-0.1, 0.2, 0.3], AllocationOptions(budget=6))
    result = allocate([-0.1, 0.2, 0.005], AllocationOptions(budget=6, min_score=0.01))
    assert result["floored_layers"] == [0, 2] and result["raw_layer_score"] == [-0.1, 0.2, 0.005]
    assert result["layer_score"] == [0.01, 0.2, 0.01]
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"layer_score": [-0.1, 0.2, 0.3], "num_layers": 3}))
    assert main(["allocate", "--similarity", str(sim), "--budget", "6", "--out", str(tmp_path / "a.json")]) == 2
    assert "--min-score raises such scores explicitly" in capsys.readouterr().err
    argv = ["allocate", "--similarity", str(sim), "--budget", "6", "--out", str(tmp_path / "a.json")]
    assert main([*argv, "--min-score", "0.05"]) == 0
    assert "layers [0] had scores below --min-score 0.05" in capsys.readouterr().out
    with pytest.raises(ValueError, match="min_score"):
        AllocationOptions(budget=4, min_score=0.0)


# The real base's profile (SmolLM2-135M-Instruct, old en, new fr/ru/el, 10K tokens a language).
REAL_PROFILE = [0.235, 0.139, 0.183, 0.119, 0.119, 0.131, 0.135, 0.147, 0.185, 0.198, 0.230, 0.294, 0.300, 0.344,
                0.348, 0.383, 0.368, 0.355, 0.370, 0.382, 0.368, 0.289, 0.315, 0.241, 0.179, 0.161, 0.179, 0.228,
                0.430, 0.615]  # fmt: skip


def test_exact_rounding_hits_the_budget_that_the_papers_ceiling_overshoots():
    ceil = allocate(REAL_PROFILE, AllocationOptions(budget=60, classifier_layers="0"))
    exact = allocate(REAL_PROFILE, AllocationOptions(budget=60, classifier_layers="0", rounding="exact"))
    assert ceil["total_experts"] == 77 and exact["total_experts"] == 60 and exact["rounding"] == "exact"
    inverse = [1 / s for s in REAL_PROFILE]
    shares = [i / sum(inverse) * 60 for i in inverse]
    assert all(abs(n - max(share, 1)) < 1 for n, share in zip(exact["experts_per_layer"], shares, strict=True))
    assert "rounding exact: largest remainder" in describe(exact) and "Eq. 10 as published" in describe(ceil)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=30),
    extra=st.integers(0, 200),
    low=st.integers(1, 3),
    span=st.one_of(st.none(), st.integers(0, 6)),
    align=st.integers(1, 4),
)
def test_exact_rounding_keeps_bounds_and_alignment_and_reaches_every_reachable_budget(scores, extra, low, span, align):
    high = None if span is None else low + span
    budget = len(scores) * low + extra
    result = allocate(scores, AllocationOptions(budget=budget, classifier_layers="0", rounding="exact",
                                                min_experts=low, max_experts=high, align=align))  # fmt: skip
    counts = result["experts_per_layer"]
    assert all((n - 1) % align == 0 for n in counts)
    lo_units = -(-(low - 1) // align)
    hi_units = None if high is None else max(lo_units, (high - 1) // align)  # the alignment wins over max
    assert all(n >= 1 + lo_units * align and (hi_units is None or n <= 1 + hi_units * align) for n in counts)
    reachable_max = None if hi_units is None else len(scores) * (1 + hi_units * align)
    target = len(scores) + (budget - len(scores)) // align * align
    if target >= len(scores) * (1 + lo_units * align) and (reachable_max is None or target <= reachable_max):
        assert sum(counts) == target


def test_the_premise_methods_spread_the_new_experts_over_the_least_or_most_similar_layers():
    least = allocate(REAL_PROFILE, AllocationOptions(budget=50, method="least-similar", focus_layers=10,
                                                     classifier_layers="0"))  # fmt: skip
    most = allocate(REAL_PROFILE, AllocationOptions(budget=51, method="most-similar", focus_layers=10,
                                                    classifier_layers="0"))  # fmt: skip
    lowest = sorted(range(30), key=lambda i: REAL_PROFILE[i])[:10]
    assert [i for i, n in enumerate(least["experts_per_layer"]) if n > 1] == sorted(lowest)
    assert {least["experts_per_layer"][i] for i in lowest} == {3} and least["new_experts"] == 20
    assert most["new_experts"] == 21 and most["experts_per_layer"][29] == 4  # the extra one: the most similar layer
    assert sorted(i for i, n in enumerate(most["experts_per_layer"]) if n > 1) == [13, 14, 15, 16, 17, 18, 19, 20,
                                                                                   28, 29]  # fmt: skip
    with pytest.raises(ValueError, match="allocate.focus_layers: 31 is larger than the number of layers"):
        allocate(REAL_PROFILE, AllocationOptions(budget=50, method="least-similar", focus_layers=31))
    with pytest.raises(ValueError, match="allocate.focus_layers: 10 is given with, and only with"):
        AllocationOptions(budget=50, method="layermoe", focus_layers=10)
    with pytest.raises(ValueError, match="gives 5 new experts, fewer than focus_layers"):
        allocate(REAL_PROFILE, AllocationOptions(budget=35, method="most-similar", focus_layers=10))
