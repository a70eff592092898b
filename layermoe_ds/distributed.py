"""How a process learns its place in the job, whichever way it was started.

`deepspeed`/`torchrun` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `mpirun` (Open MPI, MPICH,
Intel MPI, and `deepspeed --launcher openmpi|mpich`) sets none of them: the ranks are found through mpi4py, and rank
0's address is broadcast as the rendezvous (as DeepSpeed's own `mpi_discovery` does, but keeping a MASTER_PORT the
user chose). `srun` without a launcher sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID; those are adopted when
MASTER_ADDR is given (the sbatch scripts export it). Call `adopt_launcher_env()` before anything reads RANK.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from layermoe_ds.errors import InputError, MissingInputError

# torch and DeepSpeed are imported inside the functions that need them: `layermoe` imports this module at start-up
# (and the launch helpers use it), and `layermoe --help` stays at ~0.15 s instead of ~8 s. mpi4py is optional.

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
SLURM_STEP = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
DEFAULT_PORT = "29500"


def launcher_kind(environ: MutableMapping[str, str] = os.environ) -> str:
    """'torch' (RANK already set), 'mpi', 'slurm' (srun without a launcher), or 'single'.

    RANK/WORLD_SIZE inherited from a parent shell do not hide an MPI start: an MPI world of another size wins."""
    mpi_size = next((environ[name] for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE") if name in environ), None)
    if "RANK" in environ and "WORLD_SIZE" in environ and mpi_size in (None, environ["WORLD_SIZE"]):
        return "torch"
    if any(name in environ for name in MPI_MARKERS):
        return "mpi"
    if all(name in environ for name in SLURM_STEP) and "MASTER_ADDR" in environ:
        return "slurm"
    return "single"


def _first_address() -> str:
    try:
        return subprocess.check_output(["hostname", "-I"], text=True).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return socket.gethostbyname(socket.gethostname())


def adopt_launcher_env(environ: MutableMapping[str, str] = os.environ) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for an MPI or bare-srun start; return the kind."""
    kind = launcher_kind(environ)
    if kind == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise InputError(
                "started by mpirun but mpi4py is missing: pip install 'layermoe_ds[mpi]' (needs an MPI library)"
            ) from exc
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        address = comm.bcast(environ.get("MASTER_ADDR") or (_first_address() if rank == 0 else None), root=0)
        port = comm.bcast(environ.get("MASTER_PORT", DEFAULT_PORT) if rank == 0 else None, root=0)
        values = (rank, comm.Get_size(), local.Get_rank(), local.Get_size(), address, port)
        local.Free()
    elif kind == "slurm":
        values = (
            environ["SLURM_PROCID"],
            environ["SLURM_STEP_NUM_TASKS"],
            environ["SLURM_LOCALID"],
            re.match(r"\d+", environ.get("SLURM_STEP_TASKS_PER_NODE", "1")).group(),  # "4(x2)" → 4
            environ["MASTER_ADDR"],
            environ.get("MASTER_PORT", DEFAULT_PORT),
        )
    else:
        return kind
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    environ.update({name: str(value) for name, value in zip(names, values, strict=True)})
    return kind


def device_and_backend(
    requested: str | None = None,
    environ: Mapping[str, str] = os.environ,
    cuda_available: bool | None = None,
    device_count: int | None = None,
) -> tuple[str, str]:
    """(device, torch.distributed backend) for this rank, the one place that decides it.

    `requested`: None (the accelerator when there is one), "cpu", "cuda" (this rank's GPU) or "cuda:N". This rank's
    GPU is LOCAL_RANK modulo the GPUs it sees: a launcher that binds one GPU to each task (srun --gpus-per-task=1,
    mpirun with CUDA_VISIBLE_DEVICES per rank) leaves each rank one visible device, cuda:0, whatever its local rank.
    CUDA goes with NCCL, which takes CUDA tensors only: every collective of the project runs on this device; the CPU
    goes with gloo. Asking for CUDA where there is none is an error naming the option."""
    if cuda_available is None or device_count is None:
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        device_count = (torch.cuda.device_count() if cuda_available else 0) if device_count is None else device_count
    if requested is None:
        requested = "cuda" if cuda_available else "cpu"
    if requested == "cpu":
        return "cpu", "gloo"
    if not re.fullmatch(r"cuda(:\d+)?", requested):
        raise InputError(f"device: {requested!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if not cuda_available:
        raise InputError(f"device: {requested!r} asked for, but no CUDA device is visible (torch.cuda.is_available())")
    if requested == "cuda":
        requested = f"cuda:{int(environ.get('LOCAL_RANK', 0)) % max(device_count, 1)}"
    return requested, "nccl"


def leave_process_group() -> None:
    """Tear the process group down before the interpreter does, once this rank's collectives are done (registered
    with `atexit` by a command that ended well): left to interpreter shutdown, the backend's threads may outlive
    the objects they use. Not after a failure: a rank that failed leaves its peers' collectives to the launcher,
    which stops them. Not sooner: DeepSpeed keeps its expert groups for the life of the process."""
    dist = sys.modules.get("torch.distributed")  # not imported: there is no group (and no torch to load for it)
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


HOSTFILE_LINE = re.compile(r"(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)")


def read_hostfile(path: Path) -> dict[str, int]:
    """host → slots from a DeepSpeed hostfile ('<host> slots=<N>' per line, # comments, blank lines); one-line
    errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"hostfile: {path} does not exist")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.fullmatch(line)
        if match is None:
            raise InputError(f"hostfile {path}, line {number}: {raw.strip()!r} is not '<host> slots=<N>'")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise InputError(f"hostfile {path}, line {number}: {host} has slots={slots}; it must be at least 1")
        if host in hosts:
            raise InputError(f"hostfile {path}, line {number}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise InputError(f"hostfile {path}: no hosts (expected '<host> slots=<N>' lines)")
    return hosts


LARGE_ALLOCATION_BYTES = 4 * 2**20
# Opt-in (=1) for CPU training ranks: `return_large_frees_to_os` at start-up. Off by default: the page faults of
# fresh mappings made the demo's stage-2 steps ~25% slower on this project's VM (medians 0.148 → 0.188 s, three
# alternated runs each), while the memory it saves is the CPU allocator's, not the model's (GPUs have PyTorch's
# caching allocator). `bench/scale_bench.py` sets it to measure what the tensors need.
RETURN_FREES_ENV = "LAYERMOE_CPU_RETURN_FREES"


def return_large_frees_to_os(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """On a CPU rank: allocations of `threshold` bytes and more get their own mapping, unmapped when freed (glibc's
    `mallopt(M_MMAP_THRESHOLD)`); False where the C library is not glibc. By default glibc raises that threshold
    to the largest block freed so far (up to 32 MiB), so a step's activations, freed after backward, stay in the
    heap: the optimizer step's large temporaries then come on top of them, and the rank's resident memory peaks at
    what was never live at once (measured at the Qwen2-0.5B shape: stage-1 peak 10.0 → 8.2 GiB per rank). Costs
    page faults on every large allocation (see RETURN_FREES_ENV)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(ctypes.CDLL(None).mallopt(m_mmap_threshold, threshold))
