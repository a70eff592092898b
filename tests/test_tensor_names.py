"""The project's own tensor names on disk (`ds/names.py`), and exports written with the legacy names (before
2026-12-07: DeepSpeed's module path) still loading, evaluating and growing bitwise the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layermoe_ds.ds.names import disk_name, new_expert_index
from layermoe_ds.hf.files import save_model
from layermoe_ds.hf.load import load_causal_lm
from layermoe_ds.modeling.upcycle import grow, grow_dir

LEGACY = Path(__file__).parent / "fixtures" / "legacy_export"  # written by make_legacy_export.py at fa22096
FFN = "model.layers.3.mlp"


def test_training_and_legacy_names_map_to_the_names_on_disk():
    ds = f"{FFN}.moe.deepspeed_moe.experts.deepspeed_experts"
    assert disk_name(f"{FFN}.base_ffn.up_proj.weight") == f"{FFN}.experts.0.up_proj.weight"
    assert disk_name(f"{ds}.1.down_proj.weight") == f"{FFN}.experts.2.down_proj.weight"  # legacy: index = id
    assert disk_name(f"{ds}.1.down_proj.weight", {3: [0, 2, 1, 3]}) == f"{FFN}.experts.3.down_proj.weight"  # slot
    assert disk_name(f"{FFN}.gate.router.weight") == f"{FFN}.router.weight"
    assert disk_name(f"{FFN}.gate.lang_classifier.weight") == f"{FFN}.classifier.weight"
    for name in (f"{FFN}.router.weight", f"{FFN}.experts.2.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.embed_tokens.weight", "model.language_model.layers.2.feed_forward.w1.weight"):  # fmt: skip
        assert disk_name(name) == name
    assert new_expert_index(f"{ds}.1.down_proj.weight") == (3, 1)
    assert new_expert_index(f"{FFN}.experts.2.up_proj.weight") is None


def _names(directory: Path) -> list[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return list(f.keys())


def test_a_legacy_export_loads_and_computes_bitwise_what_it_did(tmp_path):
    legacy = _names(LEGACY)
    assert any(".deepspeed_experts." in n for n in legacy) and not any(".experts.0." in n for n in legacy)
    reference = load_file(LEGACY / "reference_logits.safetensors")
    model = load_causal_lm(LEGACY, torch.float32)
    with torch.no_grad():
        assert torch.equal(model(reference["input_ids"]).logits, reference["logits"])
    # Saved again, it carries today's names, and reads back to the same logits.
    save_model(model, tmp_path / "renamed")
    names = _names(tmp_path / "renamed")
    assert f"{FFN}.experts.0.up_proj.weight" in names and f"{FFN}.classifier.weight" in names
    assert not [n for n in names if "deepspeed" in n or "base_ffn" in n or ".gate." in n]
    with torch.no_grad():
        again = load_causal_lm(tmp_path / "renamed", torch.float32)(reference["input_ids"]).logits
    assert torch.equal(again, reference["logits"])


def test_a_legacy_export_grows_as_the_model_it_holds(tmp_path):
    second = {"experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1]}
    grow_dir(LEGACY, second, tmp_path / "grown")
    expected = grow(load_causal_lm(LEGACY, torch.float32), second).state_dict()
    streamed = load_file(tmp_path / "grown" / "model.safetensors")
    assert streamed.keys() <= expected.keys() and "model.layers.0.mlp.experts.4.up_proj.weight" in streamed
    for name, tensor in streamed.items():
        assert torch.equal(tensor, expected[name]), name


def test_a_legacy_export_with_mismatched_weights_is_refused_naming_todays_key(tmp_path):
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    config = json.loads((copy / "config.json").read_text())
    config["classifier_layers"] = [0]  # layer 3 loses its classifier: its stored (legacy-named) tensor is unexpected
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.3.mlp.classifier.weight'\]"):
        load_causal_lm(copy, torch.float32)
