"""DeepSpeed configuration checks, optimizer parameter groups and `deepspeed.initialize`.

Stage 2 trains only routers and classifiers (a few hundred KB). DeepSpeed's ZeRO and BF16 optimizers refuse a
model with MoE layers unless some parameter group is an MoE group, and crash on a group whose tensors are all
frozen — so gates-only training fails under them either way. Keeping the frozen experts in an MoE group with lr 0
would work but computes and stores gradients and optimizer state for every expert, which stage 2 must not pay.
Instead stage 2 runs at ZeRO stage 0 (sharding a few hundred KB of optimizer state saves nothing) with the
trainable gate tensors kept in fp32 (the router and classifier compute in fp32 anyway) and every frozen tensor in
the precision the DeepSpeed JSON asks for (`bf16.enabled`): DeepSpeed then sees a plain fp32 optimizer over the
gates and still performs the data-parallel gradient all-reduce.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from layermoe_ds.config import TrainConfig, deep_merge
from layermoe_ds.ds.internals import lazy_kernel_compile
from layermoe_ds.ds.process import SHIPPED_CONFIGS
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

DECAYED = ("new_experts", "all")  # parameter groups with weight decay: FFN experts, or the whole dense model


def load_ds_config(paths: list[Path]) -> dict:
    """The DeepSpeed JSON, with later files (e.g. cpu.json) merged over earlier ones. A bare name that is no file
    here is one of the configs the package ships (`SHIPPED_CONFIGS`: stage1_zero2.json, stage2.json, cpu.json, …)."""
    merged: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file() and path.name == str(path) and (SHIPPED_CONFIGS / path.name).is_file():
            path = SHIPPED_CONFIGS / path.name
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.json")))
            raise MissingInputError(f"deepspeed_config: {path} does not exist (shipped, by bare name: {shipped})")
        try:
            merged = deep_merge(merged, json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise InputError(f"deepspeed_config: {path} is not valid JSON ({exc})") from exc
    return merged


def check_ds_config(ds_config: dict, stage: int) -> dict:
    """Validate what LayerMoE depends on and return the config DeepSpeed gets for this stage."""
    config = copy.deepcopy(ds_config)
    zero = config.get("zero_optimization", {}).get("stage", 0)
    if zero == 3:
        raise InputError(
            "deepspeed_config: zero_optimization.stage 3 is not supported with DeepSpeed MoE "
            '("Native DeepSpeed MoE is not supported with ZeRO Stage 3"); use stage 1 or 2'
        )
    if "optimizer" in config or "scheduler" in config:
        raise InputError(
            "deepspeed_config: remove 'optimizer'/'scheduler'; layermoe builds them from the run "
            "config (lr, warmup_steps, weight_decay) so that MoE parameter groups are right"
        )
    if config.get("fp16", {}).get("enabled"):
        raise InputError("deepspeed_config: fp16 is not supported (router math is fp32, training bf16 or fp32)")
    if "train_micro_batch_size_per_gpu" not in config:
        raise InputError("deepspeed_config: train_micro_batch_size_per_gpu is required")
    if stage == 2:
        if zero:
            log.warning(
                "stage 2 trains routers and classifiers only: running ZeRO stage 0 instead of %d "
                "(see layermoe_ds/ds/engine.py)",
                zero,
            )
        config.setdefault("zero_optimization", {})["stage"] = 0
        config["bf16"] = {"enabled": False}  # frozen tensors are cast by us, trainable gates stay fp32
    if config.get("zero_optimization", {}).get("stage", 0) == 2:
        zero_cfg = config["zero_optimization"]
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero_cfg.get(key) is False:
                raise InputError(f"deepspeed_config: zero_optimization.{key} must stay true with MoE at ZeRO-2")
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def model_dtype(ds_config: dict) -> torch.dtype:
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak (as a multiplier of `lr`)."""

    def factor(step: int) -> float:
        return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)

    return factor


def engine_args(device: torch.device) -> argparse.Namespace | None:
    """What `deepspeed.initialize` is told of this rank's device: on CUDA its index (`device_rank`), which DeepSpeed
    otherwise takes to be LOCAL_RANK — wrong where a launcher binds one GPU to each task (every rank sees cuda:0)."""
    device = torch.device(device)
    return argparse.Namespace(device_rank=device.index or 0) if device.type == "cuda" else None


def initialize(
    model,
    trainable: dict[str, list[torch.nn.Parameter]],
    config: TrainConfig,
    ds_config: dict,
    device: torch.device | str = "cpu",
):
    """Parameter groups (MoE groups split out), AdamW, warm-up+cosine, `deepspeed.initialize` on `device`."""

    groups = [
        {"params": params, "name": name, "weight_decay": config.weight_decay if name in DECAYED else 0.0}
        for name, params in trainable.items()
        if params  # ZeRO crashes on a group left with no trainable tensor
    ]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # DeepSpeed collects the expert groups from a set of names, so their order follows Python's per-process string
    # hashing: two ranks, or a run and its resumption, can order them differently (a resumed ZeRO run then fails
    # with "parameter-alignment layout does not match"). Put them in a fixed order.
    groups = [g for g in groups if not g.get("moe")] + sorted(
        (g for g in groups if g.get("moe")), key=lambda g: g["name"]
    )
    # Fused (one kernel per tensor, on CPU and CUDA): the single-tensor and for-each paths build temporaries the size
    # of the moments (the second moment's square root, then its quotient), and under ZeRO a tensor is a rank's whole
    # flat partition (~1 GB per rank at 0.5B).
    fused = {p.device.type for g in groups for p in g["params"]} <= {"cpu", "cuda"}
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    # A callable: DeepSpeed builds the scheduler over its own (ZeRO-wrapped, regrouped) optimizer.
    def make_scheduler(wrapped):
        return torch.optim.lr_scheduler.LambdaLR(wrapped, lr_lambda(config))

    lazy_kernel_compile()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        args=engine_args(device), model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config
    )
    return engine, optimizer, scheduler
