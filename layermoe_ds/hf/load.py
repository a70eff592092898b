"""Load a Hugging Face decoder LM directory — a user's dense model or a LayerMoE one — checking it before any work
is done: the files there, each safetensors file whole, every stored tensor's name and shape against the model its
config.json describes (`check_tensors`, the one key and shape check). LayerMoE directories load through the
package's own classes (the same code as their remote code), so `isinstance` checks and training see one class.
A checkpoint or a run directory loads through `hf/sources.py::load_model`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

from layermoe_ds.ds.names import disk_name
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.modeling.families import check_layout
from layermoe_ds.modeling.remote.modeling_layermoe import attribute_path
from layermoe_ds.modeling.types import is_layermoe, layermoe_classes, layermoe_model_type

WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_model_dir(path: Path) -> Path:
    """A model directory needs `config.json` and weights; say which is missing."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"model: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise MissingInputError(f"model: {path} has no config.json (not a Hugging Face model directory)")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise MissingInputError(f"model: {path} has no weights ({', '.join(WEIGHT_PATTERNS)})")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights)
    return path


def check_safetensors_file(path: Path) -> None:
    """A safetensors file must be whole: its header readable and its tensors' bytes all there. An interrupted copy
    or download is one line naming the file and the bytes missing, before any work (safetensors itself says
    "incomplete metadata, file not fully covered" in a traceback)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"model: {path} is {size} bytes, too short for a safetensors file (truncated?)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > size - 8:
            raise InputError(f"model: {path} is truncated: its header alone needs {header_len + 8:,} bytes, the "
                             f"file has {size:,} (an interrupted copy or download?)")  # fmt: skip
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"model: {path} has an unreadable safetensors header ({exc})") from exc
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise InputError(f"model: {path} is truncated: its tensors need {needed:,} bytes, the file has {size:,} "
                         f"({needed - size:,} missing: an interrupted copy or download?)")  # fmt: skip


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A dense HF causal LM or a LayerMoE directory (through the package's own classes, weights verified)."""
    path = check_model_dir(path)
    hf_logging.disable_progress_bar()
    if layermoe_model_type(path):
        model = load_layermoe(path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def context_limit(config) -> int | None:
    """The positions a model was built for (None where its config does not say)."""
    text = config.get_text_config()
    return next((getattr(text, k) for k in ("max_position_embeddings", "n_positions") if getattr(text, k, None)), None)


def seq_len_for(config, seq_len: int | None, preferred: int, what: str) -> int:
    """`seq_len` as given (refused past the model's context, naming both numbers: there a model's scores mean
    nothing — a 512-position model read at 100,000 tokens gave 3.66 bits/byte for a true 2.29), or `preferred`
    capped at the context."""
    limit = context_limit(config)
    if seq_len is None:
        return min(preferred, limit) if limit else preferred
    check_context(config, seq_len, what)
    return seq_len


def check_context(config, seq_len: int, what: str) -> None:
    """A sequence longer than the model's positions is refused, naming both numbers."""
    limit = context_limit(config)
    if limit is not None and seq_len > limit:
        raise InputError(f"{what}: {seq_len} tokens is longer than the model's context ({limit} positions)")


def carry_generation_config(model, model_dir: Path):
    """The directory's generation settings (`generation_config.json`: sampling defaults, stop tokens) on `model`,
    so whatever it is saved as keeps them; the defaults derived from its config where the directory has none."""
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a HF causal LM, where its family keeps them (`modeling/families.py`)."""
    config = model.config
    if is_layermoe(model):
        return list(model.decoder_layers())
    return list(attribute_path(model, check_layout(model, getattr(config, "model_type", "")).decoder_layers))


def ffn_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's FFN (or LayerMoE block): its input is what the experts see."""
    config = model.config
    name = config.ffn_module if is_layermoe(model) else check_layout(model, config.model_type).ffn_module
    return [getattr(layer, name) for layer in decoder_layers(model)]


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
    # Written with the legacy names (ds/names.py): the same loading, each tensor handed over under today's name (as
    # the memory-mapped view from_pretrained itself would use: the same numbers to the last bit, which a copy at
    # another alignment does not give).
    state = {}
    for file in sorted(Path(path).glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            state |= {disk_name(key): f.get_tensor(key) for key in f.keys()}
    model = model_cls.from_pretrained(None, config=config, dtype=dtype, state_dict=state)
    return carry_generation_config(model, path)


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
    check_tensors(expected, stored, f"model: {path} (its weights against its config.json)")
    return current


def check_tensors(
    expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], what: str, partial: bool = False
) -> None:
    """The one key and shape check: `given` tensors (name → shape) must be exactly the `expected` ones (`partial`:
    a subset of them), or one line names the first missing and unexpected names, or the first shape that differs."""
    missing = [] if partial else sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise InputError(f"{what} do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, shape in given.items():
        if tuple(expected[key]) != tuple(shape):
            raise InputError(f"{what}: {key} has shape {tuple(shape)}, the model expects {tuple(expected[key])}")
