"""The fault matrix (CPU, 2 ranks; the runs that get killed start through the real `deepspeed` launcher): kills at
random steps, SIGTERM during a checkpoint write, checkpoints damaged afterwards, a full disk, and resuming on another
world size. Every case resumes from the newest complete, verified checkpoint and reproduces the uninterrupted run's
losses."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from layermoe_ds.checkpoints.format import MARKER, complete_checkpoints
from layermoe_ds.ds.process import Launcher
from layermoe_ds.hf.files import ShardWriter
from tests.helpers import ROOT, base_config, command, launch_env, launch_in_process, metrics, run

pytestmark = pytest.mark.distributed

RANDOM = random.Random(20261123)  # the "random steps" of the matrix, reproducible
STAGE1 = dict(steps=10, save_every=2, log_every=1, keep_last_n=2)
STAGE2 = dict(
    steps=8,
    save_every=2,
    log_every=1,
    keep_last_n=2,
    lr=0.05,
    stage2_docs_per_old_lang=200,
    stage2_docs_per_new_lang=200,
)
DS_JSON = {1: "stage1_zero2.json", 2: "stage2.json"}


def config_for(stage: int, upcycled: Path, corpus: Path, out: Path, **overrides) -> dict:
    return base_config(upcycled, corpus, out, **{**(STAGE1 if stage == 1 else STAGE2), **overrides})


@pytest.fixture(scope="module")
def upcycled(upcycled_wide) -> Path:
    """The fault matrix runs a layout where a rank holds two experts of a layer (experts [5, 3, 1]): resuming on
    another world size moves experts between DeepSpeed's slots."""
    return upcycled_wide


@pytest.fixture(scope="module")
def reference(upcycled, corpus_dir, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted 2-rank runs of stage 1 and stage 2: what every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    for stage in (1, 2):
        run(stage, config_for(stage, upcycled, corpus_dir, tmp / f"stage{stage}"), tmp, DS_JSON[stage])
    return {stage: tmp / f"stage{stage}" for stage in (1, 2)}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: record["loss/total"] for step, record in metrics(run_dir).items()}


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    assert losses(run_dir) == losses(reference_dir)
    a, b = load_file(run_dir / "model" / "model.safetensors"), load_file(reference_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def complete(run_dir: Path) -> list[str]:

    return [path.name for path in complete_checkpoints(run_dir)]


def start(stage: int, config: dict, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command(stage, config, tmp / f"killed{stage}.yaml", DS_JSON[stage], launcher=Launcher.DEEPSPEED),
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 300, poll: float = 0.05) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting to inject the fault"
        time.sleep(poll)


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:  # short-lived helpers (a compiler, `hostname -I`) may be gone already
            args = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "--local_rank=" in args:
            found[int(args.split("--local_rank=")[1].split()[0])] = child
    return found


@pytest.mark.parametrize(
    ("stage", "victim", "damage"),
    [(1, "job", "truncate"), (1, "rank 1", "delete"), (2, "rank 1", None), (2, "job", "truncate")],
    ids=["stage1-kill-job-then-truncate", "stage1-kill-rank1-then-delete", "stage2-kill-rank1", "stage2-kill-job"],
)
@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_bitwise(
    stage, victim, damage, reference, upcycled, corpus_dir, tmp_path
):  # fmt: skip
    config = config_for(stage, upcycled, corpus_dir, tmp_path / "run")
    kill_after = RANDOM.randint(3, config["steps"] - 2)
    proc = start(stage, config, tmp_path)
    wait_for(lambda: logged_steps(tmp_path / "run") >= kill_after and len(workers(proc)) == 2, proc)
    if victim == "job":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        workers(proc)[1].kill()  # the launcher sees a rank die and takes the others down
    proc.wait(timeout=120)
    before = complete(tmp_path / "run")
    assert before, f"no complete checkpoint by step {kill_after}"
    newest = tmp_path / "run" / "checkpoints" / before[-1]
    if damage is not None:  # the newest checkpoint goes bad afterwards: resume must fall back to the one before
        victim_file = max((p for p in newest.iterdir() if p.name.endswith(".pt")), key=lambda p: p.stat().st_size)
        if damage == "truncate":
            victim_file.write_bytes(victim_file.read_bytes()[: victim_file.stat().st_size // 2])
        else:
            victim_file.unlink()
    result = run(stage, config, tmp_path, DS_JSON[stage])
    if damage is not None and len(before) > 1:
        assert f"resumed from {before[-2]}" in result.stdout + result.stderr
        assert (newest.parent / f"{newest.name}.corrupt").is_dir()
    elif damage is None:
        assert f"resumed from {before[-1]}" in result.stdout + result.stderr
    assert_same_run(tmp_path / "run", reference[stage])
    assert len(complete(tmp_path / "run")) == config["keep_last_n"]


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_saves_exits_zero_and_resumes_bitwise(
    reference, upcycled, corpus_dir, tmp_path
):  # fmt: skip
    config = config_for(1, upcycled, corpus_dir, tmp_path / "run", save_every=1, steps=10)
    proc = start(1, config, tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"

    def writing() -> bool:  # a checkpoint directory without its marker: DeepSpeed is writing it; early enough
        # that the stop (agreed at the next step) lands before the last step, which would end the run normally
        dirs = list(checkpoints.glob("step_*")) if checkpoints.is_dir() else []
        early = [d for d in dirs if int(d.name.split("_")[1]) <= 7 and not (d / MARKER).exists()]
        return len(workers(proc)) == 2 and bool(early)

    wait_for(writing, proc, poll=0.005)  # a slim save takes tens of milliseconds
    for worker in workers(proc).values():
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = complete(tmp_path / "run")
    assert saved and int(saved[-1].split("_")[1]) < 10 and not (tmp_path / "run" / "model").exists()
    marker = json.loads((checkpoints / saved[-1] / MARKER).read_text())
    assert all(len(entry["sha256"]) == 64 for entry in marker["files"].values())
    run(1, config, tmp_path, DS_JSON[1])
    assert_same_run(tmp_path / "run", reference[1])


def test_disk_full_in_a_save_or_the_export_stops_with_one_line_and_a_rerun_resumes(
    single_rank, upcycled, corpus_dir, tmp_path, capsys, monkeypatch
):  # fmt: skip
    """ENOSPC from the middle of DeepSpeed's checkpoint write (a size-limited filesystem is not available to tests
    everywhere; the error is what such a filesystem raises)."""
    config = config_for(1, upcycled, corpus_dir, tmp_path / "run", steps=6, keep_last_n=1)
    code, _ = launch_in_process(1, {**config, "out": str(tmp_path / "uninterrupted")}, tmp_path, DS_JSON[1], capsys)
    assert code == 0
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(f, str | Path) and "step_00000004" in str(f) and "expert" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = launch_in_process(1, config, tmp_path, DS_JSON[1], capsys)
    errors = [line for line in err.splitlines() if line.startswith("stage1: error")]
    assert code == 1 and len(errors) == 1, err
    assert "step_00000004 could not be written (the disk is full" in errors[0] and "step_00000002, is intact" in err
    assert complete(tmp_path / "run") == ["step_00000002"]  # keep_last_n=1, yet the older one was not deleted
    monkeypatch.setattr(torch, "save", real_save)
    # the disk fills again in the export, after the last checkpoint: one line, and a rerun exports from it
    real_write = ShardWriter.write

    def full_at_export(self, name, tensor):
        if ".experts.1." in name:
            raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")
        return real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", full_at_export)
    code, err = launch_in_process(1, config, tmp_path, DS_JSON[1], capsys)
    errors = [line for line in err.splitlines() if line.startswith("stage1: error")]
    assert code == 1 and len(errors) == 1, err
    assert f"the model export {tmp_path / 'run' / 'model'} could not be written (the disk is full" in errors[0]
    assert "step_00000006, is intact; free space and rerun the same command to resume" in errors[0]
    monkeypatch.setattr(ShardWriter, "write", real_write)
    code, _ = launch_in_process(1, config, tmp_path, DS_JSON[1], capsys)
    assert code == 0
    assert_same_run(tmp_path / "run", tmp_path / "uninterrupted")
    assert complete(tmp_path / "run") == ["step_00000006"]


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_on_another_world_size(stage, single_rank, reference, upcycled, corpus_dir, tmp_path, capsys):
    """2 ranks → 1 and 1 → 2: weights (exactly), step, data position and learning-rate schedule carry over; stage 1's
    ZeRO-partitioned expert-parallel optimizer state does not (said so), stage 2's replicated gate state does."""
    ref = reference[stage]
    steps = STAGE1["steps"] if stage == 1 else STAGE2["steps"]
    config = config_for(stage, upcycled, corpus_dir, tmp_path / "one")

    # 2 → 1, nothing left to train: the exported weights are the 2-rank checkpoint's, exactly.
    shutil.copytree(ref, tmp_path / "one", ignore=shutil.ignore_patterns("model"))
    code, err = launch_in_process(stage, config, tmp_path, DS_JSON[stage], capsys)
    assert code == 0, err
    assert_same_run(tmp_path / "one", ref)
    message = "optimizer state carries over too" if stage == 2 else "optimizer state does NOT"
    assert "written by 2 ranks, resuming on 1" in err and message in err

    # 2 → 1 from the middle: the run continues at the saved step, data position and learning rate.
    shutil.rmtree(tmp_path / "one")
    shutil.copytree(ref, tmp_path / "one", ignore=shutil.ignore_patterns("model", f"step_{steps:08d}"))
    marker = json.loads((tmp_path / "one" / "checkpoints" / f"step_{steps - 2:08d}" / MARKER).read_text())
    code, err = launch_in_process(stage, config, tmp_path, DS_JSON[stage], capsys)
    assert code == 0, err
    records, ref_records = metrics(tmp_path / "one"), metrics(ref)
    assert records[steps - 1]["lr"] == ref_records[steps - 1]["lr"]
    final = json.loads((tmp_path / "one" / "checkpoints" / f"step_{steps:08d}" / MARKER).read_text())
    assert final["world_size"] == 1
    micro = json.loads((ROOT / "ds_configs" / DS_JSON[stage]).read_text())["train_micro_batch_size_per_gpu"]
    carried = final["sampler"]["cursor"] == marker["sampler"]["cursor"] + 2 * micro  # 2 steps × 1 rank × micro
    assert carried or final["sampler"]["epoch"] > marker["sampler"]["epoch"]

    # 1 → 2: a 2-rank run on the 1-rank checkpoint exports the same weights.
    shutil.copytree(tmp_path / "one", tmp_path / "two", ignore=shutil.ignore_patterns("model"))
    result = run(stage, {**config, "out": str(tmp_path / "two")}, tmp_path, DS_JSON[stage])
    assert "written by 1 ranks, resuming on 2" in result.stdout + result.stderr
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_on_fewer_ranks_the_optimizer_trains_the_experts_each_slot_now_holds(
    single_rank, reference, upcycled, corpus_dir, tmp_path, capsys
):
    """2 ranks → 1 moves experts between slots; the optimizer's fp32 copies must follow, or its next step writes the
    old slots' experts back. One step at a learning rate of 1e-10 leaves the checkpoint's weights as they were."""
    from layermoe_ds.cli import main

    steps = STAGE1["steps"]
    shutil.copytree(ref := reference[1], tmp_path / "run", ignore=shutil.ignore_patterns("model", f"step_{steps:08d}"))
    (tmp_path / "run" / "resolved_config.json").unlink()  # another learning rate: a run of its own
    config = config_for(1, upcycled, corpus_dir, tmp_path / "run", steps=steps - 1, lr=1e-10)
    code, err = launch_in_process(1, config, tmp_path, DS_JSON[1], capsys)
    assert code == 0, err
    assert main(["export", "--checkpoint", str(ref / "checkpoints" / f"step_{steps - 2:08d}"), "--out",
                 str(tmp_path / "saved")]) == 0  # fmt: skip
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    experts = [f"model.layers.0.mlp.experts.{k}.up_proj.weight" for k in (2, 3)]
    assert (saved[experts[0]] - saved[experts[1]]).abs().max() > 1e-5  # a swap would show
    for key in saved:
        torch.testing.assert_close(trained[key], saved[key], rtol=0, atol=1e-7, msg=key)


def test_export_and_evaluate_from_a_deepspeed_checkpoint(reference, corpus_dir, tmp_path):
    from layermoe_ds.cli import main
    from layermoe_ds.hf.load import load_causal_lm

    assert main(["export", "--checkpoint", str(reference[1]), "--out", str(tmp_path / "exported")]) == 0
    exported = load_causal_lm(tmp_path / "exported", torch.float32).eval()
    trained = load_causal_lm(reference[1] / "model", torch.float32).eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)
    a = load_file(tmp_path / "exported" / "model.safetensors")
    assert any(".mlp.experts.2." in key for key in a)  # expert files merged under their ids

    # `layermoe evaluate` reads a run directory's newest checkpoint directly: the numbers of the exported model.
    common = ["evaluate", "--data", str(corpus_dir), "--langs", "en,fr", "--old", "en", "--max-tokens", "300"]
    for name, model in (("run", reference[1]), ("model", reference[1] / "model")):
        assert main([*common, "--model", str(model), "--out", str(tmp_path / f"{name}.json")]) == 0
    from_run, from_model = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "model"))
    assert from_run["model"].startswith("checkpoint ") and "(step 10)" in from_run["model"]
    assert {k: v for k, v in from_run.items() if k != "model"} == {k: v for k, v in from_model.items() if k != "model"}


def test_checkpoints_are_slim_and_point_at_their_base(reference, upcycled, corpus_dir, tmp_path):
    """A checkpoint holds what training changes and a pointer to the frozen base (path, sizes, SHA-256): stage 1
    the routers (and, in DeepSpeed's per-expert files, the trained experts), stage 2 the gates alone. A moved base
    is found again by pointing at it (training resumes exactly; export takes --base); a changed one is refused."""
    from layermoe_ds.cli import main

    for stage in (1, 2):  # both reference runs start from the upcycled model
        newest = complete_checkpoints(reference[stage])[-1]
        marker = json.loads((newest / MARKER).read_text())
        assert marker["base"]["path"] == str(upcycled.resolve()) and "model.safetensors" in marker["base"]["files"]
        module = torch.load(newest / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        gates = (".router.weight", ".classifier.weight")
        assert module and all(key.endswith(gates) for key in module), sorted(module)[:5]
        experts = list(newest.glob("layer_*_expert_*"))
        assert bool(experts) == (stage == 1) and marker["gates_only"] == (stage == 2)
    # Stage 2 resumed from its step-4 checkpoint with the base moved: the uninterrupted run's numbers.
    moved = tmp_path / "moved_base"
    shutil.copytree(upcycled, moved)
    run_dir = tmp_path / "stage2"
    shutil.copytree(reference[2], run_dir)
    for path in complete_checkpoints(run_dir)[-2:]:
        if not path.name.endswith("00000004"):
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "model")
    run(2, config_for(2, moved, corpus_dir, run_dir), tmp_path, DS_JSON[2])
    assert_same_run(run_dir, reference[2])
    # Offline: the export reads the base through the pointer, or --base; a changed base is named.
    export = ["export", "--checkpoint", str(reference[2])]
    assert main([*export, "--out", str(tmp_path / "a")]) == 0
    assert main([*export, "--base", str(moved), "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = moved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert main([*export, "--base", str(moved), "--out", str(tmp_path / "c")]) == 2


LAUNCHER_STAND_IN = """
import os, signal, sys, time
marker = sys.argv[1]
def finish(*_):  # what the ranks do on SIGTERM: finish the step, save, exit 0
    time.sleep(0.5)
    open(marker, "w").write("saved " + os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
open(marker + ".ready", "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_experiment_reaches_its_launcher_and_is_waited_out(sig, tmp_path):
    """`kill PID` of a process running a stage (the experiment's `launch_stage`) used to leave the launcher and its
    ranks training on as orphans; now they get the SIGTERM and save, and the process exits 128 + the signal."""
    (tmp_path / "launcher.py").write_text(LAUNCHER_STAND_IN)
    marker = tmp_path / "marker"
    code = (
        "import os, sys; from layermoe_ds.ds.process import run_launcher\n"
        f"run_launcher([sys.executable, {str(tmp_path / 'launcher.py')!r}, {str(marker)!r}], dict(os.environ), "
        f"open({str(tmp_path / 'log')!r}, 'w'))"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not Path(f"{marker}.ready").exists():
        assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.05)
    parent.send_signal(sig)
    assert parent.wait(timeout=30) == 128 + sig
    assert marker.read_text() == "saved 600"  # the launcher saved before the parent left; torchrun's grace set
