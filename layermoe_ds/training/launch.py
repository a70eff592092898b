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
import sys
from pathlib import Path

OVERRIDES = {  # flag → TrainConfig field
    "model": str,
    "allocation": str,
    "data": str,
    "out": str,
    "steps": int,
    "seq_len": int,
    "lr": float,
    "warmup_steps": int,
    "seed": int,
    "save_every": int,
    "keep_last_n": int,
    "log_every": int,
    "expert_parallel_size": str,
    "capacity_factor": float,
    "stage2_docs_per_old_lang": int,
    "stage2_docs_per_new_lang": int,
    "resume": str,
}


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
    parser.add_argument(
        "--language-groups", default=None, help="groups in expansion order, e.g. 'en,de;fr,ru,el' (old;new)"
    )
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the launcher; LOCAL_RANK is used")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument(
        "--activation-checkpointing",
        dest="activation_checkpointing",
        action="store_true",
        default=None,
        help="recompute decoder-layer activations in the backward pass (less memory, ~1 more forward)",
    )
    if stage == 1:
        parser.add_argument(
            "--full-finetune",
            dest="full_finetune",
            action="store_true",
            default=None,
            help="the forgetting baseline: train every parameter of the dense --model (no --allocation)",
        )
    for flag, kind in OVERRIDES.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None)
    return parser


def main(stage: int, argv: list[str] | None = None) -> int:
    from layermoe_ds.config import TrainConfig, load_config, parse_groups
    from layermoe_ds.distributed import adopt_launcher_env, leave_process_group
    from layermoe_ds.training.checkpoint import CheckpointWriteError
    from layermoe_ds.training.engine import load_ds_config
    from layermoe_ds.training.loop import run_stage

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
    overrides = {flag: getattr(args, flag) for flag in OVERRIDES}
    overrides["full_finetune"] = getattr(args, "full_finetune", None)
    overrides["activation_checkpointing"] = args.activation_checkpointing
    if args.language_groups:
        overrides["language_groups"] = parse_groups(args.language_groups)
    try:
        config = load_config(TrainConfig, args.config, overrides)
        code = run_stage(stage, config, load_ds_config(args.deepspeed_config))
        atexit.register(leave_process_group)  # at exit: a process that calls main() again keeps DeepSpeed's groups
        return code
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        if args.debug:
            raise
        # Before the process group exists every rank read the same inputs: rank 0 speaks for all. After, an error
        # may be one rank's own (a file only it reads) and would be lost: every rank says it, with its rank.
        import torch.distributed as dist

        if rank == 0 or dist.is_initialized():
            print(f"stage{stage}: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:  # every rank that saw it says so: the disk may be full on one node only
        if args.debug:
            raise
        print(f"stage{stage}: error (rank {rank}): {exc}", file=sys.stderr)
        return 1


def _stacks_on_fatal_signals() -> None:
    """A rank killed by a signal (SIGABRT from a C++ library, SIGSEGV) leaves every thread's stack in its log.
    Not when stderr is no file (called in-process under a capturing test runner)."""
    try:
        faulthandler.enable()
    except io.UnsupportedOperation:
        pass
