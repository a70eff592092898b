"""Real launches of stage 1 on this machine, each against a 2-rank single-node `deepspeed --num_gpus 2` run: two
SSH-less "nodes" over loopback through the sbatch script, torchrun, mpirun and `deepspeed --launcher openmpi` (ranks
through mpi4py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, base_config, free_port, launch_env, metrics
from tests.test_cluster import BIN, CPU_CONFIGS, SLURM, fake_slurm


def stage1_config(model: Path, corpus: Path, out: Path) -> dict:
    return base_config(model, corpus, out, steps=4, save_every=4, log_every=1)


def losses(run_dir: Path) -> list[float]:
    records = metrics(run_dir)
    return [records[step]["loss/total"] for step in sorted(records)]


def check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise AssertionError(f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def single_node(upcycled, corpus_dir, tmp_path_factory) -> tuple[Path, list[float]]:
    """The reference: 2 ranks on one node through `deepspeed --num_gpus 2`; (run yaml, losses)."""
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "run.yaml").write_text(yaml.safe_dump(stage1_config(upcycled, corpus_dir, tmp / "run")))
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    command += ["launchers/stage1.py", "--config", str(tmp / "run.yaml"), "--deepspeed_config", *CPU_CONFIGS.split()]
    check(subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600), "ref")
    return tmp / "run.yaml", losses(tmp / "run")


def run_yaml_for(single_node, out: Path) -> Path:
    config = yaml.safe_load(single_node[0].read_text())
    path = out.parent / "run.yaml"
    path.write_text(yaml.safe_dump({**config, "out": str(out)}))
    return path


def loopback_alias_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_ssh_less_through_the_sbatch_script_match_one_node(single_node, tmp_path):
    """Two hosts (127.0.0.1 and 127.0.0.2, both this machine), one rank each, one SSH-less launcher per node started
    by stage1.sbatch under the srun stand-in: the same losses as 2 ranks on one node."""
    if not loopback_alias_usable():
        pytest.skip("127.0.0.2 is not usable as a second loopback host here")
    env = fake_slurm(
        tmp_path,
        ["127.0.0.1", "127.0.0.2"],
        GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()),
        DEEPSPEED=str(BIN / "deepspeed"),
        DS_CONFIG=CPU_CONFIGS,
    )
    run_yaml = run_yaml_for(single_node, tmp_path / "run")
    result = subprocess.run(
        ["bash", str(SLURM / "stage1.sbatch"), "--config", str(run_yaml)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(result, "2-node stage 1")
    assert (tmp_path / "hostfiles" / "hostfile.4242").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    assert "--node_rank=1" in result.stdout + result.stderr  # the second node's launcher ran the second rank
    assert json.loads((tmp_path / "run" / "resolved_config.json").read_text())["world_size"] == 2
    assert losses(tmp_path / "run") == single_node[1]


@pytest.mark.distributed
def test_torchrun_gives_the_deepspeed_launchers_losses(single_node, tmp_path):
    """The tests' training runs and `experiment --launcher torchrun` start ranks with torchrun: the same numbers."""
    from layermoe_ds.ds.process import Launcher, stage_command

    run_yaml = run_yaml_for(single_node, tmp_path / "run")
    command = stage_command(1, run_yaml, "stage1_zero2.json", 2, free_port(), cpu=True, launcher=Launcher.TORCHRUN)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    check(subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600), "torchrun stage 1")
    assert losses(tmp_path / "run") == single_node[1]


@pytest.fixture(scope="session")
def open_mpi() -> str:
    """mpirun (Debian's Open MPI, installed here when missing and we are root) and mpi4py in this environment."""
    if shutil.which("mpirun") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("mpirun is missing and Open MPI cannot be installed (needs root and apt-get)")
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                                 "openmpi-bin", "libopenmpi-dev"]):  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.skip(f"could not install Open MPI ({' '.join(command)}): {result.stderr.strip()[-300:]}")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "mpi4py>=4.0"]
        result = subprocess.run(pip, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"could not install mpi4py: {result.stderr.strip()[-300:]}")
    return shutil.which("mpirun")


MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,tcp"}


@pytest.mark.slow
@pytest.mark.distributed
def test_mpirun_finds_ranks_through_mpi4py(open_mpi, single_node, tmp_path):
    run_yaml = run_yaml_for(single_node, tmp_path / "run")
    # Every variable the ranks need is exported by name, as on a cluster: the session's token cache included.
    command = [open_mpi, "-n", "2", "--oversubscribe", "-x", "MASTER_PORT", "-x", "DS_ACCELERATOR"]
    command += ["-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "LAYERMOE_DATA_CACHE"]
    command += [sys.executable, "launchers/stage1.py"]
    command += ["--config", str(run_yaml), "--deepspeed_config", *CPU_CONFIGS.split()]
    env = launch_env(MASTER_PORT=str(free_port()), **MPI_ENV)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    check(result, "mpirun stage 1")
    assert json.loads((tmp_path / "run" / "resolved_config.json").read_text())["world_size"] == 2
    assert losses(tmp_path / "run") == single_node[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_openmpi_launcher(open_mpi, single_node, tmp_path):
    run_yaml = run_yaml_for(single_node, tmp_path / "run")
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    # DeepSpeed's MPI launcher exports to the ranks only some variables, and those in ./.deepspeed_env: the session's
    # token cache goes there.
    (tmp_path / ".deepspeed_env").write_text(f"LAYERMOE_DATA_CACHE={os.environ['LAYERMOE_DATA_CACHE']}\n")
    command = [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--launcher", "openmpi"]
    command += ["--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["--launcher_args=--oversubscribe", str(ROOT / "launchers" / "stage1.py"), "--config", str(run_yaml)]
    command += ["--deepspeed_config", *(str(ROOT / path) for path in CPU_CONFIGS.split())]
    env = launch_env(**MPI_ENV)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    check(result, "deepspeed --launcher openmpi stage 1")
    assert losses(tmp_path / "run") == single_node[1]
