"""The package as users install it: a wheel (not editable) in a fresh environment, run from another directory —
its launchers are modules, its DeepSpeed configs package data found by bare name, and a 2-rank stage 1 trains
through `deepspeed --module layermoe_ds.launchers.stage1` without the checkout anywhere on the path."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, base_config, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A virtual environment holding the wheel alone, the test environment's other packages visible underneath
    (a .pth line: that directory's own .pth files — the editable checkout among them — are not read)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy of the tracked files: building leaves build/ and *.egg-info behind
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist")]
    if importlib.util.find_spec("setuptools") is not None:  # else pip fetches the build backend pyproject.toml names
        build.insert(5, "--no-build-isolation")
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "_test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((tmp / "dist").glob("layermoe_ds-*.whl"))
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return env


def run_in(env: Path, args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The test environment's ninja and DeepSpeed op build (a fresh build directory would compile it again, ~60 s).
    tools = f"{env / 'bin'}:{Path(sys.executable).parent}:{clean.get('PATH', '')}"
    clean |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": tools}
    clean.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    with subprocess.Popen(args, cwd=cwd, env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as process:  # fmt: skip
        try:
            out, err = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank it started
            raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def test_the_installed_wheel_has_its_launchers_and_configs(wheel_env, tmp_path):
    probe = """
import json, layermoe_ds, layermoe_ds.launchers.stage1, layermoe_ds.launchers.profile_similarity
import layermoe_testbed.experiment.presets
from layermoe_ds.ds.process import stage_command
from layermoe_ds.ds.engine import SHIPPED_CONFIGS, load_ds_config
cmd = stage_command(1, "run.yaml", "stage1_zero2.json", 2, 29500, cpu=True)
print(json.dumps({"package": layermoe_ds.__file__, "testbed": layermoe_testbed.__file__, "command": cmd,
                  "shipped": sorted(p.name for p in SHIPPED_CONFIGS.glob("*.json")),
                  "merged": load_ds_config(["stage1_zero2.json", "cpu.json"])}))
"""
    result = run_in(wheel_env, [str(wheel_env / "bin" / "python"), "-c", probe], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(wheel_env) in out["package"] and str(ROOT) not in out["package"]
    assert str(wheel_env) in out["testbed"] and str(ROOT) not in out["testbed"]  # the testbed ships beside it
    assert out["shipped"] == ["cpu.json", "stage1_zero1.json", "stage1_zero2.json", "stage2.json"]
    assert "--module" in out["command"] and "layermoe_ds.launchers.stage1" in out["command"]
    configs = out["command"][out["command"].index("--deepspeed_config") + 1 :]
    assert all(str(wheel_env) in path and Path(path).is_file() for path in configs)
    assert out["merged"]["zero_optimization"]["stage"] == 2
    assert run_in(wheel_env, ["layermoe", "--help"], tmp_path).returncode == 0


def test_deepspeed_module_launch_from_the_wheel_trains_with_bare_config_names(
    wheel_env, upcycled, corpus_dir, tmp_path
):
    config = base_config(upcycled, corpus_dir, tmp_path / "run", steps=4, save_every=4, log_every=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    python = str(wheel_env / "bin" / "python")
    launch = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    launch += ["--module", "layermoe_ds.launchers.stage1", "--config", "run.yaml"]
    result = run_in(wheel_env, [*launch, "--deepspeed_config", "stage1_zero2.json", "cpu.json"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    resolved = json.loads((tmp_path / "run" / "resolved_config.json").read_text())
    assert resolved["world_size"] == 2
