"""Model directories in and out, tensor by tensor: read weights by name from (sharded) safetensors without loading a
model, and write a model's tensors as sharded safetensors one shard at a time.

What `upcycle` and `grow` write is described as a list of `Planned` tensors (name, shape, dtype, how to make it),
so no step ever holds more than one output shard (`--max-shard-size`, 5 GB by default as the Hugging Face hub does)
plus the input tensors it is copying, and nothing is randomly initialised only to be overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"max-shard-size: {text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match[1]), (match[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(number * scale[unit])
    if size < 1:
        raise ValueError(f"max-shard-size: {text!r} must be at least one byte")
    return size


class TensorSource:
    """A model directory's tensors by name: safetensors (one file or sharded with an index), read lazily."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"model: {self.directory} has no safetensors weights: convert pytorch_model.bin once with "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)"
            )
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in files:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    self._file_of[name] = file
                    self._meta[name] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"model: {self.directory} has no tensor {name!r}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file].get_tensor(name)


@dataclass(frozen=True)
class Planned:
    """One output tensor: its name, shape and dtype, and a function that makes it (called once, when written)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * torch.empty((), dtype=self.dtype).element_size()


def shard_plan(tensors: Sequence[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Tensors in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardWriter:
    """Tensors in, HF safetensors out, one shard in memory at a time: `model.safetensors` when everything fits in
    one shard, else `model-0000k-of-0000n.safetensors` and the index (shards are renamed once n is known)."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.storages: set[int] = set()  # of the pending tensors
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        storage = tensor.untyped_storage()
        if not tensor.is_contiguous() or storage.nbytes() != nbytes or storage.data_ptr() in self.storages:
            # A view (ZeRO's flat buffer), or one source tensor copied to several names (upcycled experts): safetensors
            # writes each name from storage of its own.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        self.storages.add(tensor.untyped_storage().data_ptr())
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.shard_of[name] = len(self.files)
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.pending_bytes, self.storages = {}, 0, set()

    def close(self) -> list[str]:
        self.flush()
        count = len(self.files)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for path, name in zip(self.files, names, strict=True):
            path.rename(self.directory / name)
        if count > 1:
            weight_map = {tensor: names[shard] for tensor, shard in self.shard_of.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_safetensors(directory: Path, tensors: Sequence[Planned], max_shard_bytes: int) -> list[str]:
    """Write planned tensors through a `ShardWriter`: each is made when added, so one shard is in memory at a time."""
    writer = ShardWriter(directory, max_shard_bytes)
    for planned in tensors:
        tensor = planned.make().to(planned.dtype)
        if tuple(tensor.shape) != planned.shape:
            raise AssertionError(f"{planned.name}: made {tuple(tensor.shape)}, planned {planned.shape}")
        writer.add(planned.name, tensor)
    return writer.close()


def copy_tokenizer(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files a model directory has; a weights-only directory has none, which is fine."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(destination) / name)
            copied.append(name)
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "merges.txt") for name in copied):
        log.warning("%s has no tokenizer files: the output has none either (give training a tokenizer)", source)
    return copied


def write_model_dir(
    out: Path,
    config,
    model_cls,
    write_weights: Callable[[Path], object],
    tokenizer_from: Path | None = None,
) -> Path:
    """A complete HF directory for `model_cls(config)` (config.json with its auto_map, the remote modeling code, the
    weights `write_weights(directory)` writes, the tokenizer files when `tokenizer_from` has them), built next to
    `out` and renamed into place: `out/config.json` existing means the directory is whole."""
    from transformers.dynamic_module_utils import custom_object_save

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with torch.device("meta"):
        skeleton = model_cls(config)  # shapes only: the code files and auto_map come from its class
    if getattr(model_cls, "_auto_class", None) is not None:
        custom_object_save(skeleton, partial, config=config)
    config.architectures = [type(skeleton).__name__]  # as `save_pretrained` records it
    config.save_pretrained(partial)
    write_weights(partial)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, partial)
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(previous)
        partial.rename(out)
        shutil.rmtree(previous)
    else:
        partial.rename(out)
    return out


def saved_keys(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of what `save_pretrained` writes for `model` (a meta skeleton is enough): its state
    dict without the tied copy of the input embeddings."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
