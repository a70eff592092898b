"""Command line shared by `launchers/stage1.py` and `launchers/stage2.py`.

    deepspeed --num_gpus 8 launchers/stage1.py --config run.yaml --deepspeed_config ds_configs/stage1_zero2.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/stage1.py ... --deepspeed_config ds_configs/stage1_zero2.json \
        ds_configs/cpu.json

The run config (YAML/JSON, `TrainConfig` fields) is overridden by the flags below; later DeepSpeed JSON files are
merged over earlier ones. Errors are one line (rank 0) and exit 2 before any step runs.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import io
import logging
import os
from pathlib import Path

import torch.distributed as dist

from layermoe_ds.config import TrainConfig, load_config
from layermoe_ds.distributed import adopt_launcher_env, leave_process_group
from layermoe_ds.ds.engine import load_ds_config
from layermoe_ds.errors import OutputWriteError, reported
from layermoe_ds.flags import add_config_flags, config_overrides
from layermoe_ds.training.loop import run_stage


def build_parser(stage: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"launchers/stage{stage}.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="run config (YAML or JSON)")
    parser.add_argument(
        "--deepspeed_config",
        type=Path,
        nargs="+",
        required=True,
        help="DeepSpeed JSON; extra files are merged over the first (e.g. ds_configs/cpu.json)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the launcher; LOCAL_RANK is used")
    parser.add_argument("--debug", action="store_true")
    # Stage 2 takes no dense full fine-tune: the flag would only be refused (build.resolve_model).
    add_config_flags(parser, TrainConfig, skip=() if stage == 1 else ("full_finetune",))
    return parser


def main(stage: int, argv: list[str] | None = None) -> int:
    args = build_parser(stage).parse_args(argv)
    _stacks_on_fatal_signals()
    adopt_launcher_env()  # mpirun / bare srun: ranks from mpi4py or Slurm's variables
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        force=True,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )

    def body() -> int:
        config = load_config(TrainConfig, args.config, config_overrides(args, TrainConfig))
        code = run_stage(stage, config, load_ds_config(args.deepspeed_config))
        atexit.register(leave_process_group)  # at exit: a process that calls main() again keeps DeepSpeed's groups
        return code

    def error_prefix(exc: BaseException) -> str | None:
        if isinstance(exc, OutputWriteError):  # every rank that saw it: the disk may be full on one node only
            return f"stage{stage}: error (rank {rank})"
        # Before the process group exists every rank read the same inputs: rank 0 speaks for all. After, an error
        # may be one rank's own (a file only it reads) and would be lost: every rank says it, with its rank.
        if rank == 0 or dist.is_initialized():
            return f"stage{stage}: error{f' (rank {rank})' if rank else ''}"
        return None

    return reported(body, args.debug, error_prefix, f"stage{stage} (rank {rank})")


def _stacks_on_fatal_signals() -> None:
    """A rank killed by a signal (SIGABRT from a C++ library, SIGSEGV) leaves every thread's stack in its log.
    Not when stderr is no file (called in-process under a capturing test runner)."""
    try:
        faulthandler.enable()
    except io.UnsupportedOperation:
        pass
