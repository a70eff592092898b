"""Starting DeepSpeed's ranks and its process group: the launch command (DeepSpeed's launcher or torchrun) and
running it as a child that a kill reaches, the environment its JIT-built CPU op needs, `deepspeed.init_distributed`,
and the shared memory its CPU all-reduce leaves. How a process learns its place in the job (MPI, Slurm, devices) is
`distributed.py`'s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import MutableMapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO

from layermoe_ds.config import StrEnum

# torch and DeepSpeed are imported inside the functions that need them: `layermoe` imports this module at start-up,
# and `layermoe --help` stays at ~0.15 s instead of ~8 s.


def init_process_group(backend: str, device: str, timeout_minutes: float) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (so its MPI discovery and groups apply) with a timeout; returns
    (rank, world size). On NCCL the rank is bound to its device first, as NCCL requires."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    else:  # DeepSpeed JIT-builds (or loads) its CPU all-reduce op in init_distributed
        jit_build_env(os.environ)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def release_shm_buffers(shm_dir: Path = Path("/dev/shm")) -> int:
    """Unlink the shared-memory segments DeepSpeed's CPU all-reduce (`deepspeed_shm_comm`) created for this job;
    returns how many. DeepSpeed never unlinks them: every CPU run, killed or not, left ~69 MB per rank in /dev/shm
    (measured: 287 segments, 19 GiB of RAM after a day of test runs here). Call once every rank has initialised:
    the ranks keep their mappings, only the names go, so nothing is left behind even after a SIGKILL."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port or not shm_dir.is_dir():
        return 0
    removed = 0
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:  # another rank of this job got it first
            pass
    return removed


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def jit_build_env(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Make DeepSpeed's JIT build of its CPU all-reduce op (on a rank's first `init_distributed`) use this
    environment's `ninja` and a build directory of this environment, whatever the launcher passed: the venv's and
    the system's ninja discard each other's build log and rebuild the op (~50 s a rank, measured), and `mpirun`
    given by its absolute path puts its own bin directory (the system's ninja) first on the ranks' PATH; venvs
    sharing ~/.cache/torch_extensions rebuild whenever they alternate (the environment's own directory is used when
    it is writable, e.g. a venv; a system-wide install keeps torch's default). Returns `environ`, changed in place."""
    bin_dir = str(Path(sys.executable).parent)
    path = environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        environ["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    if os.access(sys.prefix, os.W_OK):
        environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return environ


def cpu_launch_env(**extra: str) -> dict[str, str]:
    """The environment for starting a CPU DeepSpeed job from Python: gloo ranks with one thread each; no rendezvous
    variables inherited (an in-process DeepSpeed run leaves RANK, WORLD_SIZE, … in os.environ); and the op build
    settings of `jit_build_env` (which each rank applies again for itself)."""
    env = jit_build_env({k: v for k, v in os.environ.items() if k not in RENDEZVOUS})
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return {**env, **extra}


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"  # package data: the DeepSpeed JSONs


class Launcher(StrEnum):
    """How a single-node job starts its ranks."""

    DEEPSPEED = "deepspeed"  # DeepSpeed's launcher: hostfiles, several nodes, MPI; the one the cluster scripts use
    TORCHRUN = "torchrun"  # torchrun --standalone: one node; 4-9 s less start-up per job on a 2-core box


def stage_command(
    stage: int,
    run_config: Path,
    ds_json: str | Path,
    ranks: int,
    port: int,
    cpu: bool,
    extra_json: Sequence = (),
    launcher: Launcher = Launcher.DEEPSPEED,
) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT --module layermoe_ds.launchers.stageN --config RUN
    --deepspeed_config JSON …` (or `torchrun --standalone --nproc_per_node RANKS -m …`, which finds its own port) with
    this environment's launcher: the package's own modules and configs, no checkout needed. `ds_json` is a file or
    the name of a shipped config; `cpu` merges the shipped cpu.json over it, then any `extra_json`."""
    configs = [SHIPPED_CONFIGS / ds_json if isinstance(ds_json, str) else ds_json]
    configs += [SHIPPED_CONFIGS / "cpu.json"] if cpu else []
    module = f"layermoe_ds.launchers.stage{stage}"
    # The launchers as modules of this interpreter: no console script needs to be on PATH or beside it.
    if Launcher(launcher) == Launcher.TORCHRUN:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        cmd += ["-m", module]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port)]
        cmd += ["--module", module]
    cmd += ["--config", str(run_config), "--deepspeed_config"]
    return cmd + [str(path) for path in [*configs, *extra_json]]


# How long torchrun waits for its ranks to finish the step and save after a SIGTERM before it kills them, unless
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise: torch's 30 s is less than a step and a save of a real model (a
# SmolLM2-135M stage-1 step with 60 new experts, ~15 s on 2 CPU ranks, then a 3 GB checkpoint: killed unsaved).
SHUTDOWN_GRACE_S = 600


def run_launcher(cmd: Sequence[str], env: dict[str, str], log: IO) -> int:
    """Run a launcher (`stage_command`) as a child with its output in `log`, and wait for it; its exit status.

    A SIGTERM or SIGHUP sent to this process alone (`kill PID`) is passed on to the launcher, which passes it to
    its ranks: they finish the step, save and exit, and this process then exits with 128 + the signal. Without this
    the ranks trained on as orphans, writing into a run a rerun would start again. (Ctrl-C reaches the whole
    process group by itself.)"""
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_GRACE_S), **env}
    child = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT)
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return child.wait()
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise SystemExit(128 + received[0])
    return status
