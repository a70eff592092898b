"""A miniature experiment preset end to end (real `deepspeed` launcher, 2 CPU ranks): the report has every row with
finite numbers, and LayerMoE's stage 2 does not leave old languages worse than stage 1 alone."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

pytestmark = pytest.mark.distributed


def test_mini_experiment_report(tiny_base, corpus_dir, tmp_path, capsys):
    from layermoe_ds.experiment import DENSE_FINETUNE, LAYERMOE, UNIFORM, Preset, finite_table, run_experiment

    layermoe = replace(LAYERMOE, classifier_layers="1", budget_per_layer=2, max_experts=3, lifelong=True)
    preset = Preset(
        systems=(UNIFORM, layermoe, DENSE_FINETUNE),
        old=("en", "de"),
        new=("fr", "ru"),
        lifelong=("el",),
        profile_tokens=2000,
        seq_len=32,
        stage1_steps=12,
        stage1_lr=3e-3,
        stage2_steps=12,
        stage2_lr=0.05,
        stage2_docs=200,
        eval_max_tokens=800,
    )
    out = tmp_path / "mini"
    results = run_experiment(preset, tiny_base, corpus_dir, out)
    assert list(results) == ["dense base", UNIFORM.name, LAYERMOE.name, DENSE_FINETUNE.name]
    assert finite_table(results)
    report = (out / "report.md").read_text()
    main_table, lifelong_table = report.split("## Lifelong expansion")
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "system" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(results)
    assert all(len(row.split(" | ")) == len(rows[0].split(" | ")) for row in rows)
    # The forgetting baseline trains everything: it is dense, and its old languages get worse than the base's.
    finetuned = results[DENSE_FINETUNE.name]
    assert finetuned["eval"]["params_total"] == results["dense base"]["eval"]["params_total"]
    assert finetuned["eval"]["old_avg"]["bpb"] > results["dense base"]["eval"]["old_avg"]["bpb"]
    # Lifelong rows: the base, LayerMoE after G1 and after G2, every language evaluated, finite.
    lifelong_rows = [line for line in lifelong_table.splitlines() if line.startswith("| ") and "model" not in line]
    names = [row.split(" | ")[0][2:] for row in lifelong_rows]
    assert names == ["dense base", f"{LAYERMOE.name} after G1", f"{LAYERMOE.name} after G2"]
    for row in lifelong_rows:
        cells = row.strip("| ").split(" | ")[2:]
        assert len(cells) == 8 and all(math.isfinite(float(cell)) for cell in cells), row
    grown = json.loads((out / "systems" / "layermoe" / "lifelong" / "grown" / "config.json").read_text())
    assert grown["num_groups"] == 3 and "Lifelong expansion keeps earlier groups* (LayerMoE)" in report
    for name in ("similarity.png", "per_language.png", "routing.png", "results.json"):
        assert (out / name).stat().st_size > 0
    layermoe, uniform = results[LAYERMOE.name], results[UNIFORM.name]
    assert layermoe["allocation"]["new_experts"] <= 0.6 * uniform["allocation"]["new_experts"]
    # A property of the method, not a tuned threshold: stage 2 routes old-language tokens back to expert 0.
    assert layermoe["eval"]["old_avg"]["bpb"] <= layermoe["eval_stage1"]["old_avg"]["bpb"]
    assert "## Reading" in report and "Stage 2 restores old languages" in report

    # Cached: a rerun launches nothing and gives the same report.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name not in ("results.json",)}
    again = run_experiment(preset, tiny_base, corpus_dir, out)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_reading_judges_each_claim_from_the_numbers():
    from layermoe_ds.experiment import LAYERMOE, PRESETS, UNIFORM, compare, reading

    def system(old, new, new_experts, method, stage1_old=None, experts=(4, 2, 2, 2), classifiers=(2, 3)):
        result = {"eval": {"old_avg": {"bpb": old}, "new_avg": {"bpb": new}}}
        result["allocation"] = {"new_experts": new_experts, "method": method, "experts_per_layer": list(experts)}
        result["allocation"]["classifier_layers"] = list(classifiers)
        if stage1_old is not None:
            result["eval_stage1"] = {"old_avg": {"bpb": stage1_old}}
        return result

    results = {
        "dense base": system(2.0, 3.0, 0, "dense"),
        UNIFORM.name: system(2.10, 2.50, 12, "uniform", stage1_old=2.9),
        LAYERMOE.name: system(2.08, 2.52, 6, "layermoe", stage1_old=2.8),
        "LayerMoE w/o classifier": system(2.05, 2.5, 6, "layermoe", classifiers=()),  # better without: fails
        "LayerMoE w/ random allocation": system(2.2, 2.7, 6, "random", experts=(2, 2, 2, 4)),
        "LayerMoE, classifier on last-2 layers": system(2.08, 2.52, 6, "layermoe"),  # the same layers as LayerMoE
    }
    lines = "\n".join(reading(results, PRESETS["full"]))
    assert "50% fewer new experts" in lines and "(matched), Old-avg 2.080 vs 2.100 (matched) — replicated." in lines
    assert "The classifier protects old languages*: Old-avg 2.080 (LayerMoE) vs 2.050" in lines
    assert "vs 2.050 (LayerMoE w/o classifier) — not replicated here." in lines
    assert "Similarity-based allocation beats random at equal budget*: New-avg 2.520 (LayerMoE) vs 2.700" in lines
    assert "(LayerMoE, classifier on last-2 layers) — not testable on this model: both put the same" in lines
    results["LayerMoE w/o classifier"]["eval"]["old_avg"]["bpb"] = 2.09  # 0.5% apart: no claim either way
    lines = "\n".join(reading(results, PRESETS["full"]))
    assert "vs 2.090 (LayerMoE w/o classifier) — no difference beyond 1% here." in lines
    del results["LayerMoE, classifier on last-2 layers"]
    assert "last-2" not in "\n".join(reading(results, PRESETS["full"]))  # no such row, no such claim
    assert (compare(0.98, 1.0), compare(1.005, 1.0), compare(1.02, 1.0)) == ("better", "matched", "worse")


def test_seed_spread_and_lifelong_reading_from_the_numbers():
    from layermoe_ds.experiment import LAYERMOE, UNIFORM, Preset, lifelong_reading, seed_reading, seed_spread

    def ev(old, new):
        return {"eval": {"old_avg": {"bpb": old}, "new_avg": {"bpb": new}}}

    results = {
        "dense base": ev(2.0, 3.0),
        UNIFORM.name: ev(2.10, 2.50),
        LAYERMOE.name: ev(2.08, 2.40),
        f"{UNIFORM.name} [seed 1]": ev(2.12, 2.52),
        f"{LAYERMOE.name} [seed 1]": ev(2.10, 2.41),
        f"{UNIFORM.name} [seed 2]": ev(2.08, 2.48),
        f"{LAYERMOE.name} [seed 2]": ev(2.06, 2.39),
    }
    spread = seed_spread(results)
    assert set(spread) == {UNIFORM.name, LAYERMOE.name} and spread[LAYERMOE.name]["seeds"] == 3
    assert spread[LAYERMOE.name]["new"][0] == pytest.approx(2.40) and spread[UNIFORM.name]["new"][1] == pytest.approx(
        0.02
    )
    lines = "\n".join(seed_reading(spread))
    assert "(New-avg): LayerMoE − uniform = -0.100 bits/byte" in lines and "beyond the seed noise" in lines
    assert (
        "(Old-avg): LayerMoE − uniform = -0.020 bits/byte against a seed spread (sd) of up to 0.020 — within" in lines
    )

    preset = Preset(systems=(), old=("en",), new=("fr",), lifelong=("el",))

    def langs(en, fr, el):
        return {"languages": {"en": {"bpb": en}, "fr": {"bpb": fr}, "el": {"bpb": el}}}

    lifelong = {
        f"{UNIFORM.name} after G1": {**langs(2.0, 2.5, 3.5), "new_experts": 12},
        f"{UNIFORM.name} after G2": {**langs(2.0, 2.6, 2.8), "new_experts": 24},  # G1 forgot 4%
        f"{LAYERMOE.name} after G1": {**langs(2.0, 2.5, 3.5), "new_experts": 6},
        f"{LAYERMOE.name} after G2": {**langs(2.0, 2.51, 2.8), "new_experts": 12},
    }
    lines = "\n".join(lifelong_reading(lifelong, preset))
    assert f"earlier groups* ({UNIFORM.name}): G0-avg 2.000 → 2.000, G1-avg 2.500 → 2.600" in lines
    assert "G1-avg 2.500 → 2.600, G2-avg 3.500 → 2.800 — not replicated here." in lines
    assert f"({LAYERMOE.name}): G0-avg 2.000 → 2.000, G1-avg 2.500 → 2.510, G2-avg 3.500 → 2.800 — replicated" in lines
    assert "(LayerMoE 12 new experts in total vs uniform 24): G0/G1/G2-avg 2.000/2.510/2.800" in lines
    assert "(matched/better/matched) — replicated." in lines
