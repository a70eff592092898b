"""A training rank's model (training/build.py): built on the meta device, only local experts materialised, in the
run's dtype, equal to the model the eager path (load everything, upcycle, make expert-parallel) gives."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import base_config, free_port

pytestmark = pytest.mark.distributed


def eager(config, stage: int, world: int, dtype: torch.dtype):
    """The path training took before: the whole model in fp32, upcycled in memory, then made expert-parallel."""
    from layermoe_ds.ds.moe_layer import to_expert_parallel
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.io import read_json
    from layermoe_ds.modeling.types import is_layermoe
    from layermoe_ds.modeling.upcycle import upcycle
    from layermoe_ds.training.stages import apply_stage

    model = load_causal_lm(Path(config.model), torch.float32)
    if not is_layermoe(model):
        model = upcycle(model, read_json(Path(config.allocation), "allocation"), seed=config.seed)
    to_expert_parallel(model, world)
    model.set_classifier_routing(stage == 2)
    apply_stage(model, stage)
    for param in model.parameters():
        if not (stage == 2 and param.requires_grad):
            param.data = param.data.to(dtype)
    return model


def _worker(rank: int, world: int, port: int, dense: str, moe: str, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    import deepspeed

    from layermoe_ds.config import TrainConfig
    from layermoe_ds.training.build import build_model, resolve_model

    deepspeed.init_distributed(dist_backend="gloo")
    allocation = Path(tmp) / "alloc.json"
    census = {}
    for stage, model_dir, dtype in ((1, dense, torch.float32), (2, moe, torch.bfloat16)):
        extra = {"allocation": str(allocation)} if stage == 1 else {}
        config = TrainConfig(**{**base_config(model_dir, tmp, Path(tmp) / "run"), **extra, "seed": 3})
        built = build_model(resolve_model(config, stage), config, stage, world, dtype, torch.device("cpu"))
        reference = eager(config, stage, world, dtype)
        ours, theirs = dict(built.model.named_parameters()), dict(reference.named_parameters())
        assert ours.keys() == theirs.keys()
        for name, param in theirs.items():
            assert ours[name].dtype == param.dtype and ours[name].requires_grad == param.requires_grad, name
            assert torch.equal(ours[name], param), name
        for name, buffer in reference.named_buffers():
            assert torch.equal(dict(built.model.named_buffers())[name], buffer), name
        assert not any(p.is_meta for p in built.model.parameters())
        # Tied embeddings stay tied.
        assert built.model.lm_head.weight is built.model.model.embed_tokens.weight
        census[stage] = built.census
    (Path(tmp) / f"census_{rank}.json").write_text(json.dumps(census))


def test_meta_built_model_equals_the_eager_one_and_holds_only_local_experts(tiny_base, upcycled, tmp_path):
    (tmp_path / "alloc.json").write_text(
        json.dumps({"method": "layermoe", "experts_per_layer": [3, 2, 3], "classifier_layers": [0, 2]})
    )
    assert json.loads((upcycled / "config.json").read_text())["experts_per_layer"] == [3, 2, 3]
    mp.spawn(_worker, args=(2, free_port(), str(tiny_base), str(upcycled), str(tmp_path)), nprocs=2)
    census = [json.loads((tmp_path / f"census_{r}.json").read_text()) for r in range(2)]
    for stage in ("1", "2"):
        # Layers 0 and 2 have 2 new experts, split over the 2 ranks; layer 1 has 1, replicated.
        assert [c[stage]["experts"] for c in census] == [{"0": [0], "1": [0], "2": [0]}, {"0": [1], "1": [0], "2": [1]}]
    assert census[0]["2"]["bytes"] < census[0]["1"]["bytes"]  # stage 2's frozen tensors in bf16
