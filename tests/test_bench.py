"""Test-sized runs of the benchmark scripts: they work and their outputs are sane (never a timing assertion)."""

import importlib.util
import json
import math
from pathlib import Path

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
