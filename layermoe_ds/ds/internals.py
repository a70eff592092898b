"""Every place layermoe_ds reaches into DeepSpeed past its documented API, and the versions that is tested on.

DeepSpeed's MoE is used through `deepspeed.moe.layer.MoE` (ds/moe_layer.py: its gate slot and dispatch tuple,
docs/model.md) and its engine through `deepspeed.initialize` (ds/engine.py). What else the project needs — the
expert-parallel ranks, the engine's MoE checkpoint switch, the optimizer's fp32 master copies, its Muon kernels
compiled lazily — is here, so a DeepSpeed upgrade is checked in one file; `check_version` refuses a DeepSpeed outside
the supported range at start-up, in one line naming both.
"""

from __future__ import annotations

import contextlib
import functools
from importlib import metadata

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from layermoe_ds.errors import InputError

SUPPORTED = SpecifierSet(">=0.19.8,<0.20")  # setup.cfg's range; constraints.txt pins the tested release


def check_version(installed: str | None = None) -> str:
    """The installed DeepSpeed's version, or one line naming it and the supported range."""
    installed = installed or metadata.version("deepspeed")
    if Version(installed) not in SUPPORTED:
        raise InputError(
            f"DeepSpeed {installed} is installed; layermoe_ds supports deepspeed{SUPPORTED} "
            "(pip install -c constraints.txt -e . installs the tested set)"
        )
    return installed


def lazy_kernel_compile() -> None:
    """DeepSpeed's ZeRO gradient reduction imports its Muon optimizer module on every rank (to ask whether the
    optimizer is Muon), and that module wraps three kernels in `torch.compile` as it is imported, which loads
    torch._dynamo and inductor: ~1.9 s of CPU in every rank of every launch, for an optimizer layermoe_ds never uses
    (it trains with AdamW; `engine.check_ds_config` refuses a JSON optimizer). DeepSpeed's `compiler.compile()` —
    used by those kernels alone — then wraps a function to be compiled on its first call instead: the same kernels
    if Muon ever runs, nothing loaded until then. Idempotent."""
    from deepspeed.runtime import compiler

    if getattr(compiler.compile, "lazy", False):
        return

    def lazily(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)

        return call

    def compile():  # noqa: A001 — DeepSpeed's name
        return lazily

    compile.lazy = True
    compiler.compile = compile


def expert_parallel_rank(group_name: str) -> int:
    """This rank's index within its expert-parallel group `group_name` (which slots of a layer it holds)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(group_name)


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's index among the ranks holding the same experts of `group_name` (0: the one that sends them)."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(group_name)


@contextlib.contextmanager
def moe_files_hidden(engine, hide: bool):
    """With `hide`, DeepSpeed saves and loads the model as a dense one (one file of the trainable tensors and the
    optimizer, read by every rank on any world size) instead of one file per expert: for runs that train only
    replicated gates."""
    was = engine.has_moe_layers
    engine.has_moe_layers = was and not hide
    try:
        yield
    finally:
        engine.has_moe_layers = was


def refresh_master_weights(engine) -> None:
    """After weights were written into the module behind the optimizer's back: ZeRO and bf16 copy them into their
    fp32 master copies (without it the next step writes the old values back)."""
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def release_optimizer(engine) -> int:
    """Free what only the optimizer holds: Adam's moments and (ZeRO, bf16) the fp32 master copies of the trained
    tensors. The weights are the module's and stay; the engine cannot step afterwards. Returns the bytes released."""
    optimizer = engine.optimizer
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap the torch optimizer
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    if masters is None:
        masters = getattr(optimizer, "fp32_groups_flat_partition", None) or []  # bf16 without ZeRO
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    released = sum(t.numel() * t.element_size() for t in [*moments, *masters])
    engine.destroy()  # DeepSpeed's gradient hooks off
    inner.state.clear()
    if masters:
        masters.clear()
        for group in inner.param_groups:
            group["params"] = []
    engine.optimizer = None
    return released
