"""Save and load LayerMoE models as Hugging Face directories that load with `trust_remote_code=True`.

`save_pretrained` copies the modeling files (modeling/remote/*.py) next to the weights, so the directory loads with
plain transformers, without DeepSpeed or layermoe_ds. Inside layermoe_ds, LayerMoE directories load through the
package's own classes (same code), so `isinstance` checks and the training path see one class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from layermoe_ds.ds.names import disk_name
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.io import directory_in_place
from layermoe_ds.modeling.types import layermoe_classes, layermoe_model_type


def save_model(model, out: Path, tokenizer=None) -> Path:
    """Save weights (safetensors), config with auto_map, the remote modeling code and the tokenizer.

    Written next to `out` and renamed into place, so `out/config.json` existing means the directory is whole (a
    kill during the export leaves the previous directory, or none)."""
    with directory_in_place(out) as partial:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    return Path(out)


def load_layermoe(path: Path, dtype: torch.dtype = torch.float32):
    """Load a LayerMoE directory with the package's classes, after checking every stored tensor's key and shape
    against the model its config.json describes."""
    config_cls, model_cls = layermoe_classes(layermoe_model_type(path))
    try:
        config = config_cls.from_pretrained(path)
    except ValueError as exc:
        raise InputError(f"model: {path}/config.json is not a valid LayerMoE config: {exc}") from exc
    with torch.device("meta"):
        skeleton = model_cls(config)
    if verify_weights(skeleton, path):
        return model_cls.from_pretrained(path, dtype=dtype)
    # Written with the legacy names (ds/names.py): each tensor read under today's name into a model built on meta.
    from layermoe_ds.modeling.base_tensors import base_loader
    from layermoe_ds.modeling.hf_loading import carry_generation_config
    from layermoe_ds.modeling.materialize import materialize, parameters_on_meta

    with parameters_on_meta():
        model = model_cls(config)
    materialize(model, base_loader(model, path, from_dense=False, seed=None), lambda name, param: dtype)
    return carry_generation_config(model, path).to(dtype)


def verify_weights(model, path: Path) -> bool:
    """The checkpoint's tensors must be exactly the model's: a config/weights mismatch names the key and shape.
    Names are compared on disk's terms (legacy names mapped, `ds/names.py`); returns whether they are today's."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MissingInputError(f"model: {path} has no safetensors weights")
    stored = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                stored[key] = tuple(f.get_slice(key).get_shape())
    current = all(disk_name(key) == key for key in stored)
    stored = {disk_name(key): shape for key, shape in stored.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        stored.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"model: {path} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, shape in stored.items():
        if expected[key] != shape:
            raise InputError(f"model: {path}: {key} has shape {shape} but config.json implies {expected[key]}")
    return current
