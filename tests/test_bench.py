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


@pytest.mark.distributed
def test_stage_bench_runs(tiny_base, corpus_dir, tmp_path, capsys):
    from tests.helpers import free_port

    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"experts_per_layer": [3, 2, 3], "classifier_layers": [0, 2]}))
    out = tmp_path / "stage_bench.json"
    assert (
        load_bench("stage_bench").main(
            [
                "--model",
                str(tiny_base),
                "--allocation",
                str(alloc),
                "--data",
                str(corpus_dir),
                "--steps",
                "6",
                "--seq-len",
                "32",
                "--port",
                str(free_port()),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["stage2_over_stage1_step"] > 0 and math.isfinite(result["stage2_over_stage1_step"])
    # Measured bytes, not times: ZeRO-1 and expert parallelism shrink each rank's share.
    assert 0.3 < result["zero1_world2_over_world1_optimizer_bytes"] < 0.8
    assert result["stage2_optimizer_bytes_per_rank"] < 0.05 * result["optimizer_bytes_per_rank_world1"]
    assert "stage 2 / stage 1" in capsys.readouterr().out
