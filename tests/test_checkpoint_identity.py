"""Checkpoints rebuild the model they saved, whatever the expert layout: ranks holding two or more experts (where
DeepSpeed's slot numbers are not the experts' ids), 4 ranks with an expert-data-parallel group, a grown (lifelong)
model, and runs started from a dense base. Every path that rebuilds a model from a checkpoint — `export
--checkpoint`, `evaluate RUN` — must give the run's own export bit for bit. (Resuming on another world size with such
a layout: tests/test_faults.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layermoe_ds.checkpoints.format import MARKER, complete_checkpoints
from tests.helpers import GROUPS, base_config, run

pytestmark = pytest.mark.distributed

WIDE = [5, 3, 1]  # layer 0: 4 new experts (2 a rank on 2 ranks), layer 1: 2 new, layer 2 dense


def exported_from_checkpoint(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from layermoe_ds.cli import main
    from layermoe_ds.io import current_umask

    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    weights = out / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # a teammate can read it (not 0600)
    return load_file(weights)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:4]


def new_experts_differ(tensors: dict[str, torch.Tensor], layer: int, ids: list[int]) -> bool:
    """Trained experts of one layer are pairwise different (else a swap between them would go unnoticed)."""
    weights = [tensors[f"model.layers.{layer}.mlp.experts.{i + 1}.up_proj.weight"] for i in ids]
    return all(not torch.equal(weights[i], weights[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))


@pytest.fixture(scope="module")
def from_dense(tiny_base, corpus_dir, tmp_path_factory) -> Path:
    """Stage 1 straight from the dense base with `allocation` [5, 3, 1] on 2 ranks (ZeRO-2), saved at step 4."""
    tmp = tmp_path_factory.mktemp("from_dense")
    allocation = tmp / "alloc.json"
    allocation.write_text(json.dumps({"experts_per_layer": WIDE, "classifier_layers": [0, 1]}))
    config = base_config(tiny_base, corpus_dir, tmp / "run", steps=4, save_every=4, allocation=str(allocation))
    run(1, config, tmp, "stage1_zero2.json")
    return tmp / "run"


def test_export_from_a_dense_base_run_with_two_experts_a_rank_equals_the_run_export(from_dense, tiny_base, tmp_path):
    in_run = load_file(from_dense / "model" / "model.safetensors")
    assert new_experts_differ(in_run, 0, [0, 1, 2, 3])
    newest = complete_checkpoints(from_dense)[-1]
    marker = json.loads((newest / MARKER).read_text())
    assert marker["expert_slots"] == {"0": [0, 2, 1, 3], "1": [0, 1]}  # rank 0 holds experts 0 and 2
    pointer = marker["base"]
    assert pointer["path"] == str(tiny_base.resolve()) and pointer["allocation"]["experts_per_layer"] == WIDE
    assert pointer["seed"] == 0
    assert_same_tensors(exported_from_checkpoint(from_dense, tmp_path / "exported"), in_run)

    # A checkpoint written before markers recorded the slot table, the upcycling allocation and its seed: the same.
    old = tmp_path / "old_run"
    shutil.copytree(from_dense, old, ignore=shutil.ignore_patterns("model"))
    old_marker = {k: v for k, v in marker.items() if k != "expert_slots"}
    old_marker["base"] = {k: v for k, v in pointer.items() if k != "seed"} | {"allocation": None}
    (complete_checkpoints(old)[-1] / MARKER).write_text(json.dumps(old_marker))
    assert_same_tensors(exported_from_checkpoint(old, tmp_path / "exported_old"), in_run)


def test_evaluate_a_dense_base_run_gives_its_exported_models_numbers(from_dense, corpus_dir, tmp_path):
    from layermoe_ds.cli import main

    common = ["evaluate", "--data", str(corpus_dir), "--langs", "en,fr", "--old", "en", "--max-tokens", "300"]
    for name, model in (("run", from_dense), ("model", from_dense / "model")):
        assert main([*common, "--model", str(model), "--out", str(tmp_path / f"{name}.json")]) == 0
    from_run, from_model = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "model"))
    assert from_run["model"].startswith("checkpoint ") and "(step 4)" in from_run["model"]
    assert {k: v for k, v in from_run.items() if k != "model"} == {k: v for k, v in from_model.items() if k != "model"}


@pytest.mark.slow
def test_four_rank_lifelong_run_exports_the_same_from_its_checkpoint(upcycled_wide, corpus_dir, tmp_path):
    """A grown model ([5, 3, 1] twice: layer 0 has 8 new experts, 4 of each group) on 4 ranks: layer 0 at ep 4 with
    one G1 and one G2 expert a rank, layer 1 at ep 2 with an expert-data-parallel group of 2."""
    from layermoe_ds.cli import main

    (tmp_path / "alloc_g2.json").write_text(json.dumps({"experts_per_layer": WIDE, "classifier_layers": [1]}))
    grown = tmp_path / "grown"
    grow = ["grow", "--model", str(upcycled_wide), "--allocation", str(tmp_path / "alloc_g2.json")]
    assert main([*grow, "--out", str(grown)]) == 0
    groups = [GROUPS[0], ["fr", "ru"], ["el"]]
    config = base_config(grown, corpus_dir, tmp_path / "run", steps=2, save_every=2, language_groups=groups)
    run(1, config, tmp_path, "stage1_zero2.json", ranks=4)
    resolved = json.loads((tmp_path / "run" / "resolved_config.json").read_text())
    assert resolved["ep_sizes"] == {"0": 4, "1": 2}
    in_run = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert new_experts_differ(in_run, 0, [4, 5, 6, 7]) and new_experts_differ(in_run, 1, [2, 3])
    marker = json.loads((complete_checkpoints(tmp_path / "run")[-1] / MARKER).read_text())
    assert marker["expert_slots"] == {"0": [0, 4, 1, 5, 2, 6, 3, 7], "1": [0, 2, 1, 3]}
    assert_same_tensors(exported_from_checkpoint(tmp_path / "run", tmp_path / "exported"), in_run)


def test_a_base_missing_a_tensor_is_named_in_one_line(from_dense, tiny_base, tmp_path, capsys):
    from safetensors.torch import save_file

    from layermoe_ds.checkpoints.format import file_entry
    from layermoe_ds.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    tensors = load_file(base / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    shutil.copytree(from_dense, run_dir, ignore=shutil.ignore_patterns("model"))
    marker_file = complete_checkpoints(run_dir)[-1] / MARKER
    marker = json.loads(marker_file.read_text())
    marker["base"]["files"]["model.safetensors"] = file_entry(base / "model.safetensors")
    marker_file.write_text(json.dumps(marker))
    code = main(["export", "--checkpoint", str(run_dir), "--base", str(base), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "model.layers.1.mlp.experts.0.up_proj.weight is neither in it nor in its base" in err
    assert f"{base} has no tensor 'model.layers.1.mlp.up_proj.weight'" in err
