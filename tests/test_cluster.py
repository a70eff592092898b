"""Cluster set-ups on one machine: the Slurm scripts against a faked Slurm, the launcher environment, and lint of the
shell scripts and the Dockerfile. Real multi-process launches: tests/test_launchers.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from tests.helpers import ROOT, launch_env

BIN = Path(sys.executable).parent
SLURM = ROOT / "launchers" / "slurm"
CPU_CONFIGS = "ds_configs/stage1_zero2.json ds_configs/cpu.json"

# A stand-in for srun: one copy of the command per node (SLURM_NODEID = 0..N-1), concurrently, as srun starts one
# task per node; SIGTERM is forwarded to every task, as srun does; exit status = the worst task's.
SRUN = """\
#!{python}
import os, signal, subprocess, sys
argv = sys.argv[1:]
nodes, tasks = 1, None
while argv and argv[0].startswith("--"):
    flag = argv.pop(0)
    if flag.startswith("--nodes="):
        nodes = int(flag.split("=")[1])
    elif flag.startswith("--ntasks="):
        tasks = int(flag.split("=")[1])
with open(os.environ["SRUN_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
procs = []
for node in range(tasks or nodes):
    env = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"}}
    procs.append(subprocess.Popen(argv, env=env))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
sys.exit(max(p.wait() for p in procs))
"""

SCONTROL = """\
#!/usr/bin/env bash
echo "scontrol $*" >> "$SCONTROL_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; fi
"""


def fake_slurm(tmp: Path, hosts: list[str], **env: str) -> dict:
    """PATH with stub srun/scontrol, and the variables an sbatch job sees."""
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "srun").write_text(SRUN.format(python=sys.executable))
    (stubs / "scontrol").write_text(SCONTROL)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return {
        **launch_env(),
        "PATH": f"{stubs}:{BIN}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "fake[01-02]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "FAKE_HOSTS": " ".join(hosts),
        "SRUN_LOG": str(tmp / "srun.log"),
        "SCONTROL_LOG": str(tmp / "scontrol.log"),
        "HOSTFILE_DIR": str(tmp / "hostfiles"),
        "LAYERMOE_VENV": str(tmp / "no-venv"),
        **env,
    }


def recording_stub(path: Path, body: str = "") -> Path:
    """A command that appends its node, arguments and rendezvous to $STUB_LOG, then runs `body`."""
    path.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$(basename "$0") node=${SLURM_NODEID:-} master=${MASTER_ADDR:-}:${MASTER_PORT:-} $*" >> "$STUB_LOG"\n'
        + body
    )
    path.chmod(0o755)
    return path


def stub_log(tmp: Path) -> list[str]:
    return sorted((tmp / "stub.log").read_text().splitlines())


def test_stage_sbatch_builds_hostfile_and_one_ssh_less_launcher_per_node(tmp_path):
    deepspeed = recording_stub(tmp_path / "deepspeed")
    env = fake_slurm(
        tmp_path,
        ["gpu-a01", "gpu-a02"],
        GPUS_PER_NODE="4",
        DEEPSPEED=str(deepspeed),
        STUB_LOG=str(tmp_path / "stub.log"),
    )
    result = subprocess.run(
        ["bash", str(SLURM / "stage1.sbatch"), "--config", "runs/x/stage1.yaml", "--steps", "9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hostfiles" / "hostfile.4242").read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
    assert (tmp_path / "scontrol.log").read_text() == "scontrol show hostnames fake[01-02]\n"
    srun = (tmp_path / "srun.log").read_text().splitlines()
    assert srun == [f"--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL bash {SLURM}/node.sh "
                    "launchers/stage1.py --resume auto --config runs/x/stage1.yaml --steps 9 "
                    "--deepspeed_config ds_configs/stage1_zero2.json"]  # fmt: skip
    hostfile = tmp_path / "hostfiles" / "hostfile.4242"
    assert stub_log(tmp_path) == [
        f"deepspeed node={n} master=gpu-a01:{29500 + 4242 % 1000} --hostfile {hostfile} --no_ssh --node_rank {n} "
        f"--master_addr gpu-a01 --master_port 29742 launchers/stage1.py --resume auto --config runs/x/stage1.yaml "
        "--steps 9 --deepspeed_config ds_configs/stage1_zero2.json"
        for n in (0, 1)
    ]
    assert "on 2 node(s) x 4 ranks, rendezvous gpu-a01:29742" in result.stdout


def test_stage_sbatch_outside_slurm_names_what_is_missing(tmp_path):
    env = {k: v for k, v in fake_slurm(tmp_path, ["a"]).items() if k != "SLURM_JOB_NODELIST"}
    result = subprocess.run(["bash", str(SLURM / "stage2.sbatch")], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST: not inside a Slurm allocation" in result.stderr


def test_pipeline_sbatch_runs_dependent_steps_once(tmp_path):
    """profile → allocate → stage 1 → stage 2 → evaluate, each writing what the next reads; a rerun skips them all."""
    run_dir = tmp_path / "run"
    writes = textwrap.dedent(
        """\
        out=""; prev=""
        for arg in "$@"; do [ "$prev" = --out ] && out="$arg"; prev="$arg"; done
        case "$*" in
          *profile_similarity.py*|*allocate*|*evaluate*) echo '{}' > "$out" ;;
          *stage[12].py*) mkdir -p "$out/model" && echo '{}' > "$out/model/config.json" ;;
        esac
        """
    )
    stubs = {name: recording_stub(tmp_path / name, writes) for name in ("deepspeed", "layermoe")}
    env = fake_slurm(
        tmp_path,
        ["n1", "n2"],
        GPUS_PER_NODE="8",
        DEEPSPEED=str(stubs["deepspeed"]),
        STUB_LOG=str(tmp_path / "stub.log"),
        PATH=f"{tmp_path}:{fake_slurm(tmp_path, [])['PATH']}",
        MODEL="/models/base",
        DATA="/data/text",
        OLD="en,de",
        NEW="fr,ru",
        RUN_DIR=str(run_dir),
        BUDGET="12",
        DS_CONFIG2="ds_configs/stage2.json ds_configs/cpu.json",
    )
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(SLURM / "pipeline.sbatch")], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    log = (tmp_path / "stub.log").read_text().splitlines()
    steps = [re.sub(r"node=\d ", "", line).split(" --")[0] for line in log]
    ds = "deepspeed master=n1:29742"
    # Two launchers for each distributed step, one process for allocate/evaluate, and nothing on the second run.
    assert steps == [ds] * 2 + ["layermoe master=n1:29742 allocate"] + [ds] * 4 + ["layermoe master=n1:29742 evaluate"]
    assert "launchers/profile_similarity.py --model /models/base --data /data/text --old en,de --new fr,ru" in log[0]
    assert f"--budget 12 --classifier-layers 7 --out {run_dir}/allocation.json" in log[2]
    stage2 = [line for line in log if "stage2.py" in line]
    assert len(stage2) == 2 and all(
        f"--model {run_dir}/stage1/model" in line
        and "--language-groups en,de;fr,ru --deepspeed_config ds_configs/stage2.json ds_configs/cpu.json" in line
        for line in stage2
    )
    assert log[-1].endswith(f"--langs en,de,fr,ru --old en,de --out {run_dir}/eval.json")
    assert "pipeline done" in result.stdout


TRAINER = """\
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def save(*_):
    out.joinpath("saved").write_text("checkpoint")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
out.joinpath("started").write_text("")
time.sleep(120)
"""


def test_sigterm_reaches_the_trainers_and_requeues(tmp_path):
    """`--signal=B:TERM@N` signals the batch shell only: it must reach the trainers under srun → node.sh → the
    DeepSpeed runner (which does not forward it) → its per-node launcher, and the job must be requeued."""
    (tmp_path / "trainer.py").write_text(TRAINER)
    # Like the runner: starts the "trainer" (a --local_rank process) and dies on SIGTERM without passing it on.
    deepspeed = recording_stub(
        tmp_path / "deepspeed", f"{sys.executable} {tmp_path}/trainer.py {tmp_path} --local_rank=0\n"
    )
    env = fake_slurm(
        tmp_path, ["solo"], GPUS_PER_NODE="1", DEEPSPEED=str(deepspeed), STUB_LOG=str(tmp_path / "stub.log")
    )
    batch = subprocess.Popen(
        ["bash", str(SLURM / "stage1.sbatch"), "--config", "x.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    batch.send_signal(signal.SIGTERM)
    output, _ = batch.communicate(timeout=60)
    assert batch.returncode == 0, output
    assert (tmp_path / "saved").read_text() == "checkpoint"
    assert (tmp_path / "scontrol.log").read_text().splitlines()[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in output


def test_launcher_env_adopts_bare_srun_and_leaves_torch_launchers_alone(monkeypatch):
    from deepspeed.launcher.runner import fetch_hostfile

    from layermoe_ds.distributed import adopt_launcher_env, launcher_kind

    srun = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    env = {**srun, "MASTER_ADDR": "node-01"}
    assert adopt_launcher_env(env) == "slurm"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"
    }  # fmt: skip
    assert adopt_launcher_env(dict(srun)) == "single"  # the batch shell: no rendezvous given, no guessing
    torch_env = {"RANK": "3", "WORLD_SIZE": "4", "OMPI_COMM_WORLD_SIZE": "4"}
    assert adopt_launcher_env(torch_env) == "torch" and torch_env["RANK"] == "3"
    assert launcher_kind({"RANK": "0", "WORLD_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"  # leaked RANK
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ValueError, match=r"mpi4py is missing: pip install 'layermoe_ds\[mpi\]'"):
        adopt_launcher_env({"OMPI_COMM_WORLD_SIZE": "2"})
    assert list(fetch_hostfile(str(ROOT / "launchers" / "hostfile.example")).values()) == [8, 8]


# --- lint: shell scripts and the Dockerfile ---------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    scripts = [*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), *(ROOT / "scripts").glob("*.sh"), ROOT / ".ci" / "run"]
    result = subprocess.run(
        [str(BIN / "shellcheck"), "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint_and_takes_versions_from_the_install_script():
    dockerfile = (ROOT / "Dockerfile").read_text()
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    # One place per version: torch in scripts/install.sh, DeepSpeed in setup.cfg; the image reuses the script.
    assert "bash scripts/install.sh" in dockerfile
    assert not re.search(r"(torch|deepspeed)\s*==", dockerfile, re.I)
    torch_pin = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', (ROOT / "scripts/install.sh").read_text())
    torch_range = re.search(r"^\s+torch(\S+)$", (ROOT / "setup.cfg").read_text(), re.M)
    assert torch_pin and torch_range and SpecifierSet(torch_range.group(1)).contains(torch_pin.group(1))
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\S+-devel-\S+", base.group(1)), "pinned CUDA devel"
    assert "TORCH_CUDA_ARCH_LIST" in dockerfile and "DS_BUILD_FUSED_ADAM=1" in dockerfile and "ds_report" in dockerfile
    assert re.search(r"^USER (?!root|0)", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs", "artifacts"} <= set(ignored)


def test_one_function_decides_device_and_backend():
    from layermoe_ds.distributed import device_and_backend

    assert device_and_backend(None, {}, cuda_available=False) == ("cpu", "gloo")
    assert device_and_backend(None, {"LOCAL_RANK": "3"}, cuda_available=True, device_count=8) == ("cuda:3", "nccl")
    assert device_and_backend("cuda", {"LOCAL_RANK": "1"}, cuda_available=True, device_count=8) == ("cuda:1", "nccl")
    # srun/mpirun binding one GPU to each task: every rank sees one device, cuda:0, whatever its local rank
    assert device_and_backend("cuda", {"LOCAL_RANK": "5"}, cuda_available=True, device_count=1) == ("cuda:0", "nccl")
    assert device_and_backend(None, {"LOCAL_RANK": "5"}, cuda_available=True, device_count=4) == ("cuda:1", "nccl")
    assert device_and_backend("cuda:0", {"LOCAL_RANK": "1"}, cuda_available=True) == ("cuda:0", "nccl")
    assert device_and_backend("cpu", {"LOCAL_RANK": "1"}, cuda_available=True) == ("cpu", "gloo")  # asked for
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        device_and_backend("cuda", {}, cuda_available=False)
    with pytest.raises(ValueError, match="'tpu' is not 'cpu', 'cuda' or 'cuda:N'"):
        device_and_backend("tpu", {}, cuda_available=True)


def test_deepspeed_is_told_the_ranks_gpu_not_its_local_rank():
    from layermoe_ds.ds.engine import engine_args

    assert engine_args(torch.device("cuda:0")).device_rank == 0  # LOCAL_RANK 5 with one GPU bound to the task
    assert engine_args(torch.device("cuda:3")).device_rank == 3
    assert engine_args(torch.device("cpu")) is None


def test_cpu_ranks_return_large_frees_to_the_os():
    """glibc's mallopt takes the setting (in a child: it lasts for the process)."""
    import platform

    code = "from layermoe_ds.distributed import return_large_frees_to_os as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(platform.libc_ver()[0] == "glibc")


def test_ranks_build_deepspeeds_op_with_this_environments_ninja(monkeypatch):
    """`mpirun /abs/path` puts the system's bin first on the ranks' PATH; the ranks put this environment's back."""
    from layermoe_ds.ds.process import jit_build_env

    own = str(Path(sys.executable).parent)
    env = jit_build_env({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep)[0] == own and env["TORCH_EXTENSIONS_DIR"].startswith(sys.prefix)
    assert jit_build_env(dict(env)) == env  # once is enough
    assert jit_build_env({"PATH": own, "TORCH_EXTENSIONS_DIR": "/x"})["TORCH_EXTENSIONS_DIR"] == "/x"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a system-wide install: torch's default stays
    assert "TORCH_EXTENSIONS_DIR" not in jit_build_env({"PATH": own})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_make_bench_gpu_refuses_in_one_line_without_a_gpu(tmp_path):
    stamp = tmp_path / "installed"  # newer than setup.cfg: make takes the environment as installed
    stamp.touch()
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), "bench-gpu", f"VENV={venv}", f"STAMP={stamp}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.splitlines()[0].startswith("make bench-gpu: no CUDA GPU is visible here")
