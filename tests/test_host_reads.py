"""Host reads (GPU→CPU syncs) counted on CPU: the LayerMoE blocks add none to a decoding step and one a layer to a
larger forward; an expert-parallel training micro-step reads at most once per MoE layer (the capacity agreement) and
the step's metrics once in all."""

from __future__ import annotations

import json

import pytest
import torch

from layermoe_ds.training.host_reads import HOST_READS, HostReads
from tests.helpers import base_config, run


def reads(fn) -> HostReads:
    with torch.no_grad(), HostReads() as counted:
        fn()
    return counted


def test_counter_sees_each_kind_of_host_read():
    x = torch.arange(6.0)
    counted = reads(lambda: (x.sum().item(), x.tolist(), x[x > 2], torch.nonzero(x), bool(x.any()), int(x[0])))
    assert counted.counts == {"item": 3, "tolist": 1, "boolean mask": 1, "nonzero": 1}
    assert reads(lambda: (x * 2).cumsum(0).masked_fill(x > 2, 0)).total == 0


def test_layermoe_blocks_add_no_host_read_when_decoding_and_one_a_layer_otherwise(tiny_base, upcycled):
    from layermoe_ds.modeling.hf_loading import load_causal_lm

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
    assert reads(step["m"]).total == reads(step["d"]).total
    # A forward over 80 tokens: one read a layer (the per-expert counts that size the grouped GEMMs).
    full_dense, full_moe = reads(lambda: dense(input_ids=ids)), reads(lambda: moe(input_ids=ids))
    assert full_moe.total - full_dense.total == layers, (full_moe.counts, full_dense.counts)
    assert full_moe.counts["tolist"] - full_dense.counts.get("tolist", 0) == layers


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_expert_parallel_micro_step_reads_once_a_moe_layer(stage, upcycled_wide, corpus_dir, tmp_path):
    """Experts [5, 3, 1] on 2 ranks: layers 0 and 1 expert-parallel. Per rank: ≤ 1 read a MoE layer in the
        micro-step (forward, losses, backward, metrics accumulated on the device) besides transformers' one a forward,
    and 1 for the step's metrics."""
    extra = {} if stage == 1 else {"stage2_docs_per_old_lang": 50, "stage2_docs_per_new_lang": 50}
    config = base_config(upcycled_wide, corpus_dir, tmp_path / "run", steps=2, count_host_reads=True, **extra)
    run(stage, config, tmp_path, "stage1_zero2.json" if stage == 1 else "stage2.json")
    report = json.loads((tmp_path / "run" / HOST_READS).read_text())
    assert report["step"] == 1 and report["moe_layers"] == 2 and len(report["ranks"]) == 2
    for counts, sites in zip(report["ranks"], report["sites"], strict=True):
        ours = {site: n for site, n in sites["micro_step"].items() if site.startswith("layermoe_ds/")}
        assert sum(ours.values()) <= report["moe_layers"], sites["micro_step"]
        # transformers' own mask code reads once a forward (the dense model's too); nothing else does
        theirs = {site: n for site, n in sites["micro_step"].items() if site not in ours}
        assert all(site.startswith("transformers/") for site in theirs) and sum(theirs.values()) <= 1, theirs
        assert counts["metrics"] == {"total": 1, "tolist": 1}
