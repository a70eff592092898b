"""Host reads (GPU→CPU syncs) counted on CPU: the LayerMoE blocks add none to a decoding step on an accelerator and
one a layer to a larger forward; an expert-parallel training micro-step reads at most once per MoE layer (the
capacity agreement) and the step's metrics once in all."""

from __future__ import annotations

import json

import pytest
import torch

from layermoe_ds.training.host_reads import HostReads


def reads(fn) -> HostReads:
    with torch.no_grad(), HostReads() as counted:
        fn()
    return counted


def test_counter_sees_each_kind_of_host_read():
    x = torch.arange(6.0)
    counted = reads(lambda: (x.sum().item(), x.tolist(), x[x > 2], torch.nonzero(x), bool(x.any()), int(x[0])))
    assert counted.counts == {"item": 3, "tolist": 1, "boolean mask": 1, "nonzero": 1}
    assert reads(lambda: (x * 2).cumsum(0).masked_fill(x > 2, 0)).total == 0


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu", "accelerator"])
def test_layermoe_blocks_add_no_host_read_when_decoding_and_one_a_layer_otherwise(
    tiny_base, upcycled, accelerator, monkeypatch
):
    """Where a host read stalls a stream (an accelerator; here as under torch.compile, which takes the same path),
    a decoding step runs every expert and reads nothing; on the CPU, where the read is free, it reads the loads
    once a layer and runs only the experts chosen."""
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.modeling.remote import layermoe_block

    if accelerator:
        monkeypatch.setattr(layermoe_block.torch.compiler, "is_compiling", lambda: True)

    dense = load_causal_lm(tiny_base, torch.float32).eval()
    moe = load_causal_lm(upcycled, torch.float32).eval()
    layers = len(moe.moe_blocks())
    ids = torch.randint(0, moe.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for model in (dense, moe):  # warm-up: lazily built tables are not the forward's cost
        model(input_ids=ids)
    # A decoding step: the prompt in the cache, one new token a row.
    cache = {name: m(input_ids=ids[:, :-1], use_cache=True).past_key_values for name, m in (("d", dense), ("m", moe))}
    step = {"d": lambda: dense(input_ids=ids[:, -1:], cache=cache["d"]),
            "m": lambda: moe(input_ids=ids[:, -1:], cache=cache["m"])}  # fmt: skip
    assert reads(step["m"]).total == reads(step["d"]).total + (0 if accelerator else layers)
    # A forward over 80 tokens: one read a layer (the per-expert counts that size the grouped GEMMs).
    full_dense, full_moe = reads(lambda: dense(input_ids=ids)), reads(lambda: moe(input_ids=ids))
    assert full_moe.total - full_dense.total == layers, (full_moe.counts, full_dense.counts)
    assert full_moe.counts["tolist"] - full_dense.counts.get("tolist", 0) == layers


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_micro_step_reads_once_a_moe_layer(tiny_base, corpus_dir, tmp_path, capsys):
    """bench/host_reads_bench.py on 2 ranks, stage 1 from the dense base with experts [5, 3, 1] (two new experts a
    rank in layer 0) and stage 2 after it, with and without activation checkpointing. Per rank and micro-step: ≤ 1
    read a MoE layer from the project (the capacity agreement; twice with checkpointing, which recomputes the
    forward) beside transformers' one a forward; 1 for the step's metrics."""
    from tests.helpers import free_port
    from tests.test_bench import load_bench

    (tmp_path / "alloc.json").write_text(json.dumps({"experts_per_layer": [5, 3, 1], "classifier_layers": [0, 1]}))
    argv = ["--model", str(tiny_base), "--allocation", str(tmp_path / "alloc.json"), "--data", str(corpus_dir)]
    argv += ["--language-groups", "en,de;fr,ru,el", "--seq-len", "32", "--port", str(free_port())]
    assert (
        load_bench("host_reads_bench").main([*argv, "--launcher", "torchrun", "--out", str(tmp_path / "r.json")]) == 0
    )
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 4 and "stage-1 micro-step reads by site" in capsys.readouterr().out
    for name, row in rows.items():
        passes = 2 if "checkpointing" in name else 1
        assert row["moe_layers"] == 2 and row["metrics"] == 1, name
        ours = {site: n for site, n in row["micro_step_sites"].items() if site.startswith("layermoe_ds/")}
        theirs = {site: n for site, n in row["micro_step_sites"].items() if site not in ours}
        assert sum(ours.values()) <= passes * row["moe_layers"], (name, ours)
        assert all(site.startswith("transformers/") for site in theirs), (name, theirs)
        assert sum(theirs.values()) <= passes, (name, theirs)
