"""Test-sized runs of the benchmark scripts: they work and their outputs are sane (never a timing assertion)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_bench_runs(tiny_base, corpus_dir, tmp_path, capsys):
    out = tmp_path / "profile_bench.json"
    assert (
        load_bench("profile_bench").main(
            [
                "--model",
                str(tiny_base),
                "--data",
                str(corpus_dir),
                "--langs",
                "en,ru",
                "--tokens-per-lang",
                "300",
                "--seq-len",
                "32",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["tokens"] == 600 and math.isfinite(result["profile_over_forward_throughput"])
    assert math.isfinite(result["hook_overhead_vs_body"])
    assert "profile throughput / plain forward throughput" in capsys.readouterr().out


def test_moe_block_bench_runs(tmp_path, capsys):
    out = tmp_path / "moe_block_bench.json"
    assert load_bench("moe_block_bench").main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    ratios = json.loads(out.read_text())["widths"]["tiny"]["ratios"]
    assert set(ratios) == {
        "expert0_only_over_dense",
        "top2_of_4_over_dense",
        "top2_of_8_over_dense",
        "deepspeed_over_ours_top2_of_8",
    }
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert "as fast as DeepSpeed's stock MoE" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["32,64,2"], ids=["random-shape"])  # the demo model's path: test_experiment
@pytest.mark.distributed
def test_stage_bench_runs(tiny_base, corpus_dir, tmp_path, capsys, shape):
    from tests.helpers import free_port

    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"experts_per_layer": [3, 2, 3], "classifier_layers": [0, 2]}))
    out = tmp_path / "stage_bench.json"
    argv = ["--model", str(tiny_base), "--allocation", str(alloc), "--data", str(corpus_dir), "--steps", "6"]
    argv += ["--seq-len", "32", "--port", str(free_port()), "--launcher", "torchrun", "--out", str(out)]
    if shape:  # a random model of that shape with 4 experts per layer (the tokenizer from --model)
        argv += ["--random-shape", shape, "--experts", "4"]
    assert load_bench("stage_bench").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["stage2_over_stage1_step"] > 0 and math.isfinite(result["stage2_over_stage1_step"])
    # Measured bytes, not times: ZeRO-1 and expert parallelism shrink each rank's share.
    assert 0.3 < result["zero1_world2_over_world1_optimizer_bytes"] < 0.8
    assert result["stage2_optimizer_bytes_per_rank"] < 0.05 * result["optimizer_bytes_per_rank_world1"]
    assert result["model"] == (shape or str(tiny_base))
    # Dropless is the default: no route dropped; the capped run at capacity factor 1.25 is the one that may drop.
    assert result["stage1_routes_dropped"] == 0
    assert result["dropless_over_dropping_stage1_step"] > 0
    assert "stage 2 / stage 1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_bench_runs(tiny_base, corpus_dir, tmp_path, capsys):
    from tests.helpers import free_port

    out = tmp_path / "memory_bench.json"
    argv = ["--tokenizer-from", str(tiny_base), "--data", str(corpus_dir), "--language-groups", "en,de;fr,ru"]
    argv += ["--hidden", "32", "--ffn", "64", "--layers", "2", "--heads", "2", "--experts", "4", "--steps", "2"]
    argv += ["--seq-len", "32", "--port", str(free_port()), "--launcher", "torchrun", "--out", str(out)]
    assert load_bench("memory_bench").main(argv) == 0
    report = json.loads(out.read_text())
    variants, summary = report["variants"], report["summary"]
    assert list(variants) == ["no ZeRO", "ZeRO-1", "ZeRO-2", "ZeRO-2 + activation checkpointing"]
    assert all(
        math.isfinite(v["peak_mib_max_over_ranks"]) and v["peak_mib_max_over_ranks"] > 0 for v in variants.values()
    )
    # Bytes, not times. 3 new experts on 2 ranks run replicated (ep_size gcd(3, 2) = 1): without ZeRO each rank holds
    # Adam's two fp32 moments for every trainable parameter, and only those (frozen parameters hold none). ZeRO adds
    # an fp32 master copy and shards the three over 2 ranks: (4 + 8) / 2 = 6 bytes per parameter, 0.75x.
    assert variants["no ZeRO"]["optimizer_bytes_per_rank"] == pytest.approx(summary["adam_bytes_if_unsharded"], rel=0.1)
    assert summary["zero1_over_none_optimizer_bytes"] == pytest.approx(0.75, rel=0.1)
    assert summary["zero2_over_none_optimizer_bytes"] == pytest.approx(0.75, rel=0.1)
    assert "activation checkpointing" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
def test_precision_bench_runs_bf16_beside_fp32(tiny_base, corpus_dir, tmp_path, capsys):
    from tests.helpers import free_port

    out = tmp_path / "precision_bench.json"
    argv = ["--model", str(tiny_base), "--data", str(corpus_dir), "--language-groups", "en,de;fr,ru"]
    argv += ["--experts", "3,2,1", "--steps", "3", "--seq-len", "32", "--port", str(free_port())]
    assert load_bench("precision_bench").main([*argv, "--launcher", "torchrun", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    fp32, bf16 = result["runs"]["fp32"], result["runs"]["bf16"]
    assert len(fp32["losses"]) == len(bf16["losses"]) == 3 and fp32["losses"] != bf16["losses"]  # bf16 did run
    assert result["max_loss_diff"] == max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True))
    assert result["max_loss_diff"] < 0.1  # bf16 rounding, not another model: the same start, data and seed
    assert result["bf16_over_fp32_step"] > 0 and result["experts_per_layer"] == [3, 2, 1]
    assert "bf16 ÷ fp32 step time" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.rehearsal  # the GPU checks' path, as scripts/device_check.sh --smoke runs it too (make test-real)
def test_gpu_bench_smoke_path_runs_on_cpu(tiny_base, corpus_dir, tmp_path, capsys):
    from tests.helpers import free_port

    out = tmp_path / "gpu_bench.json"
    bench = load_bench("gpu_bench")
    argv = ["--smoke", "--tokenizer-from", str(tiny_base), "--data", str(corpus_dir)]
    argv += ["--language-groups", "en,de;fr,ru", "--steps", "3", "--port", str(free_port()), "--launcher", "torchrun"]
    argv += ["--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    dense, moe = report["systems"].values()
    assert report["experts_per_layer"] == [5, 3, 2, 3]  # the published list's shape at 4 layers
    for row in (dense, moe):
        assert row["tokens_per_s_per_gpu"] > 0 and row["peak_mib"] > 0
        assert row["mfu_model"] is None  # no peak FLOP/s for a CPU: no made-up MFU
    # Counted, not timed: a token's active parameters in the MoE model exceed the dense model's (top-2 per layer),
    # and stage 1 needs fewer FLOPs than 6·N_active (frozen weights get no gradient).
    assert moe["params_active"] > dense["params_active"] and moe["needed_flops"] < moe["model_flops"]
    assert dense["needed_flops"] == dense["model_flops"]
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    assert "at equal active parameters" in capsys.readouterr().out


def test_flop_counts_match_hand_computation():
    bench = load_bench("gpu_bench")
    shape = {"hidden": 4, "ffn": 8, "layers": 2, "vocab": 10, "seq_len": 3}
    dense = bench.flops_per_token(shape, None)
    per_layer = 4 * 16 + 2 * 4 + 3 * 4 * 8  # attention + norms, FFN
    assert dense["params_active"] == 2 * per_layer + 40
    assert dense["model_flops"] == 6 * (2 * per_layer + 40) + 12 * 2 * 4 * 3
    moe = bench.flops_per_token(shape, [3, 1])  # layer 0: top-2 of 3 (+ a 4×3 router), layer 1 dense
    assert moe["params_active"] == (72 + 2 * 96 + 12) + (72 + 96) + 40
    assert moe["params_trainable_active"] == 2 * 96 + 12  # two new experts can be active in layer 0, + router
    assert moe["needed_flops"] == 4 * moe["params_active"] + 2 * (2 * 96 + 12) + 12 * 2 * 4 * 3


@pytest.mark.slow
def test_data_bench_tokenize_part_runs(corpus_dir, tokenizer_dir, tmp_path, capsys):
    out, data = tmp_path / "data_bench.json", tmp_path / "slice"
    data.mkdir()
    for file in corpus_dir.glob("*.txt"):  # a quarter of each file: six tokenize runs, each needs only to run
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        (data / file.name).write_text("".join(lines[: max(1, len(lines) // 4)]), encoding="utf-8")
    argv = ["--data", str(data), "--tokenizer", str(tokenizer_dir), "--copies", "2", "--chunk-mb", "0.05"]
    assert load_bench("data_bench").main([*argv, "--no-stage", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = results["tokenize"]
    assert set(runs) == {"1x, 1 worker", "1x, 2 workers", "2x, 2 workers"}
    # The new languages' train text doubled (the old languages' and the held-out splits did not).
    assert runs["2x, 2 workers"]["tokens"] > 1.3 * runs["1x, 2 workers"]["tokens"]
    assert runs["1x, 1 worker"]["tokens"] == runs["1x, 2 workers"]["tokens"]
    for run in runs.values():
        assert run["vs_anchor"] > 0 and run["disk_bytes_per_token"] < 2.2 and run["main_peak_mib"] > 0
    assert "÷ workers×anchor" in capsys.readouterr().out
    formats = results["formats"]  # the same text as .jsonl and as Parquet: the same tokens
    assert formats["jsonl 1x"]["tokens"] == formats["parquet 1x"]["tokens"] == runs["1x, 2 workers"]["tokens"]
    assert formats["parquet 2x"]["tokens"] == runs["2x, 2 workers"]["tokens"]
    assert set(results["format_ratios"]) == {"parquet_vs_jsonl_tokens_per_s", "parquet_peak_rss_big_vs_1x"}


def test_scale_bench_sizing_table(capsys):
    assert load_bench("scale_bench").main(["--sizing"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 4 and "| llama-3.2-3b | 2–5 (84) |" in table and "GiB" in table


def test_step_memory_bench_runs(tmp_path, capsys):
    out = tmp_path / "step_memory.json"
    argv = [
        "--hidden",
        "32",
        "--vocab",
        "3000",
        "--softcap-vocab",
        "5000",
        "--ffn",
        "64",
        "--tokens",
        "80",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    assert load_bench("step_memory_bench").main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows.keys() == {"loss", "loss_softcap", "swiglu", "moe_block"}
    for row in rows.values():
        assert row["seconds_plain"] > 0 and row["seconds_lean"] > 0 and math.isfinite(row["memory_ratio"])
    assert "next-token loss, fused chunked / HF" in capsys.readouterr().out


def test_generate_bench_runs(tmp_path, capsys):
    out = tmp_path / "generate_bench.json"
    argv = ["--shape", "64,128,4", "--new-tokens", "3", "--repeats", "1", "--batches", "1,2", "--out", str(out)]
    assert load_bench("generate_bench").main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == [f"batch{b}_{kind}" for b in (1, 2) for kind in ("new-language", "old-language")]
    for row in runs.values():
        assert all(math.isfinite(v) and v > 0 for v in row.values())
        assert row["layermoe_bytes_per_step"] > 0 and 0 < row["roofline"] <= 1.0
    # old-language tokens go to expert 0 alone on the classifier layers: fewer bytes a step than new-language ones
    assert runs["batch1_old-language"]["roofline"] > runs["batch1_new-language"]["roofline"]
    assert "roofline" in capsys.readouterr().out
