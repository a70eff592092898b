"""`layermoe calibrate`: the grid's presets, the epoch cap checked before anything trains, and the choice."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from layermoe_ds.errors import InputError
from layermoe_ds.io import sha256_file
from layermoe_testbed import calibration
from layermoe_testbed.calibration import Calibration, GridPoint, choose, point_preset, point_summary
from layermoe_testbed.experiment import DENSE_BASE, Preset, RunId
from layermoe_testbed.experiment.presets import PAPER

GRID = Calibration(points=(GridPoint("deep", 150), GridPoint("deep-narrow", 450)))


def _evaluation(old: float, new: float) -> dict:
    return {"old_avg": {"bpb": old}, "new_avg": {"bpb": new}}


def _results(preset: Preset, final: dict[str, list[float]], wall_s: float) -> dict:
    """Runs of `preset`'s two systems with the given final New-avg per seed (stage 1: 0.1 better, same spread)."""
    results = {}
    for system in preset.systems:
        for seed, new in zip(system.seeds, final[system.name], strict=True):
            results[RunId(system.name, seed)] = {
                "eval": _evaluation(3.1, new), "eval_stage1": _evaluation(3.6, new - 0.1), "wall_s": wall_s,
            }  # fmt: skip
    return results


def test_each_point_runs_uniform_at_both_budgets_with_the_paper_settings():
    preset = point_preset(GRID, GRID.points[1])
    assert [(s.budget_per_layer, s.min_experts, s.max_experts, s.seeds) for s in preset.systems] == [
        (2, 2, 2, (0, 1)),
        (6, 6, 6, (0, 1)),
    ]
    assert (preset.base, preset.stage1_steps, preset.lifelong) == ("deep-narrow", 450, ())
    assert preset.stage2_settings == PAPER.stage2_settings and preset.eval_max_tokens == PAPER.eval_max_tokens
    with pytest.raises(InputError, match="unknown base presets \\['wide'\\]"):
        Calibration(points=(GridPoint("wide", 150),))
    with pytest.raises(InputError, match="at least 2 seeds"):
        Calibration(points=GRID.points, seeds=(0,))


def test_the_cheapest_point_whose_gap_is_three_pooled_sds_is_chosen():
    preset = point_preset(GRID, GRID.points[0])
    low, high = (s.name for s in preset.systems)
    # gap 0.05; each budget's two seeds 0.02 apart: sd 0.02/√2 each, pooled the same: 3.54 sds (qualifies)
    clear = point_summary(_results(preset, {low: [3.00, 3.02], high: [2.95, 2.97]}, 200.0), preset, 3.0)
    assert clear["final"]["gap"] == pytest.approx(0.05)
    assert clear["final"]["pooled_sd"] == pytest.approx(0.02 / 2**0.5)
    assert clear["final"]["gap_over_sd"] == pytest.approx(0.05 / (0.02 / 2**0.5))
    assert clear["meets"] and clear["wall_s_per_run"] == 200.0
    assert clear["stage1"]["gap"] == pytest.approx(0.05)
    assert clear["old_final"][0]["mean"] == pytest.approx(3.1)
    # the same gap with eleven times the spread does not qualify
    noisy = point_summary(_results(preset, {low: [2.90, 3.12], high: [2.85, 3.07]}, 100.0), preset, 3.0)
    assert noisy["final"]["gap_over_sd"] == pytest.approx(0.05 / (0.22 / 2**0.5)) and not noisy["meets"]
    sized = {"stage1_steps": 150, "base_params": 3_000_000}
    slow_small = {**clear, **sized, "point": "slow but small", "base_params": 2_000_000, "wall_s_per_run": 300.0}
    rows = [{**noisy, **sized, "point": "noisy"}, {**clear, **sized, "point": "clear"}, slow_small]
    assert choose(rows)["point"] == "slow but small"  # compute first, wall time only between equals
    assert choose([*rows[:2], {**clear, **sized, "point": "faster", "wall_s_per_run": 150.0}])["point"] == "faster"
    assert choose(rows[:1]) is None
    report = {"budgets": (2, 6), "seeds": (0, 1), "ratio": 3.0, "max_epochs": 1.0, "choice": None}
    row = {**noisy, "point": "noisy", "ffn": 352, "base_params": 3_240_000, "later_share": 0.08, "stage1_epochs": 0.04}
    assert calibration.calibration_lines({**report, "points": [row]})[-1].startswith("**No point qualifies**")


def test_a_point_that_would_repeat_the_text_is_refused_before_anything_trains_and_the_grid_is_summarised(
    corpus_dir, tokenizer_dir, tiny_base, tmp_path, monkeypatch
):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "tokenizer").symlink_to(tokenizer_dir)
    monkeypatch.setattr(calibration, "prepare_base", lambda data, artifacts, cache, name: tiny_base)
    trained = []
    monkeypatch.setattr(calibration, "run_experiment", lambda *args, **kwargs: trained.append(args))
    settings = Preset(systems=(), seq_len=32)
    grid = Calibration(points=(GridPoint("deep", 1), GridPoint("deep-rare", 100_000)), settings=settings)
    one_step = calibration.stage1_epochs(point_preset(grid, grid.points[0]), corpus_dir, tokenizer_dir)
    assert 0 < one_step < 0.01  # 8 blocks of 32 tokens out of the slice's fr, ru, el
    with pytest.raises(InputError, match=r"deep-rare base, 100000 stage-1 steps: \d+\.\d\d") as error:
        calibration.run_calibration(grid, corpus_dir, artifacts, tmp_path / "cache", tmp_path / "out", None)
    assert f"{100_000 * one_step:.2f}" in str(error.value)
    assert not trained

    # Within the cap: each point's experiment runs (here: made-up results), and the choice is written.
    finals = {1: ([3.00, 3.01], [2.99, 3.00]), 2: ([3.00, 3.02], [2.95, 2.97])}  # 1 step: 1.4 sds; 2 steps: 3.5 sds

    kept = []  # what each point's experiment was told of its finished stages' checkpoints

    def experiment(preset, base, data, out, launcher=None, keep_checkpoints=None):
        trained.append(out.name)
        kept.append(keep_checkpoints)
        low, high = (s.name for s in preset.systems)
        results = _results(preset, dict(zip((low, high), finals[preset.stage1_steps], strict=True)), 100.0)
        dense = {
            "eval": {"params_total": 3_000_000},
            "base_sha256": {"model.safetensors": sha256_file(base / "model.safetensors")},
        }
        return {RunId(DENSE_BASE): dense, **results}

    monkeypatch.setattr(calibration, "run_experiment", experiment)
    grid = Calibration(points=(GridPoint("deep", 1), GridPoint("deep-rare", 2)), settings=settings)
    report = calibration.run_calibration(grid, corpus_dir, artifacts, tmp_path / "cache", tmp_path / "out", None)
    assert trained == ["deep-base-1-stage-1-steps", "deep-rare-base-2-stage-1-steps"] and kept == [False, False]
    assert report["choice"] == "deep-rare base, 2 stage-1 steps" and [r["meets"] for r in report["points"]] == [0, 1]
    assert report["points"][1]["base_sha256"] == sha256_file(tiny_base / "model.safetensors")
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["choice"] == report["choice"]
    table = (tmp_path / "out" / "calibration.md").read_text()
    ffn = json.loads((tiny_base / "config.json").read_text())["intermediate_size"]  # the base's own
    assert f"| deep-rare base, 2 stage-1 steps | {ffn} | 3.00M | 2% |" in table
    assert "**Chosen: deep-rare base, 2 stage-1 steps**" in table

    # Cheapest first, stopping at the first that qualifies: the dearer points are not trained, and the report says so.
    trained.clear()
    cheap_first = replace(grid, points=(GridPoint("deep", 2), GridPoint("deep", 1)), stop_when_met=True)
    report = calibration.run_calibration(
        cheap_first, corpus_dir, artifacts, tmp_path / "cache", tmp_path / "o2", None, keep_checkpoints=True
    )
    assert trained == ["deep-base-2-stage-1-steps"] and report["not_run"] == ["deep base, 1 stage-1 steps"]
    assert kept[-1] is True
    table = (tmp_path / "o2" / "calibration.md").read_text()
    assert "Not run (an earlier, cheaper point qualified): deep base, 1 stage-1 steps." in table


def test_the_real_grid_compares_one_and_three_new_experts_a_layer_on_the_real_base_with_its_settings():
    grid = calibration.GRIDS["real"]
    preset = point_preset(grid, grid.points[0])
    assert preset.base == "smollm2" and preset.old == ("en",) and preset.seq_len == 256
    assert [s.budget_per_layer - 1 for s in preset.systems] == [1, 3]  # new experts a layer
    assert [p.stage1_steps for p in grid.points] == [60, 180] and grid.stop_when_met
    report = {"budgets": grid.budgets, "seeds": grid.seeds, "ratio": 3.0, "max_epochs": 1.0, "points": [],
              "choice": None, "not_run": [], "settings": grid.settings_name}  # fmt: skip
    assert "every other setting the real-premise preset's" in calibration.calibration_lines(report)[2]
