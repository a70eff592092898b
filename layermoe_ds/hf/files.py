"""Model directories in and out, tensor by tensor: read weights by name from (sharded) safetensors without loading a
model, and write a model's tensors as sharded safetensors one shard at a time.

What `upcycle` and `grow` write is described as a list of `PlannedTensor` tensors (name, shape, dtype, how to make it),
so no step ever holds more than one output shard (`--max-shard-size`, 5 GB by default as the Hugging Face hub does)
plus the input tensors it is copying, and nothing is randomly initialised only to be overwritten.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from layermoe_ds.ds.names import disk_name
from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.io import directory_in_place

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
        raise InputError(f"max-shard-size: {text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match[1]), (match[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(number * scale[unit])
    if size < 1:
        raise InputError(f"max-shard-size: {text!r} must be at least one byte")
    return size


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_HEADER_ALIGN = 8


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name → {dtype, shape, data_offsets}, where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + size


class TensorSource:
    """A model directory's tensors by name, from its safetensors (one file or sharded with an index), each read
    with a plain file read when asked for: nothing is memory-mapped, so the input never sits in the resident set."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("model*.safetensors"))
        if not files:
            raise MissingInputError(
                f"model: {self.directory} has no safetensors weights: convert pytorch_model.bin once with "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)"
            )
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in files:
            header, data_start = read_header(file)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self._where[name] = (file, data_start + begin, end - begin)
                self._meta[name] = (tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]])

    def renamed(self, names: dict[str, str]) -> TensorSource:
        """The same tensors under other names (file name → module name, e.g. `families.dense_tensor_names`)."""
        self._where = {names.get(name, name): where for name, where in self._where.items()}
        self._meta = {names.get(name, name): meta for name, meta in self._meta.items()}
        return self

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"model: {self.directory} has no tensor {name!r}")
        file, offset, size = self._where[name]
        shape, dtype = self._meta[name]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(size)
        with open(file, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != size:
                raise InputError(f"{file}: truncated (tensor {name} ends past the end of the file)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def model_source(directory: Path) -> TensorSource:
    """A model directory's tensors under their names on disk: a LayerMoE export written with the legacy names
    (`ds/names.py`) is read under today's."""
    source = TensorSource(directory)
    return source.renamed({name: disk_name(name) for name in source.names()})


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, shape and dtype, and a function that makes it (called once, when written)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class ShardWriter:
    """HF safetensors written tensor by tensor: the layout (names, shapes, dtypes, in order) is known up front, so
    each shard's header is written first and every tensor's bytes follow as it arrives — one tensor in memory at a
    time. `model.safetensors` when everything fits in one shard, else `model-0000k-of-0000n.safetensors` and the
    index."""

    def __init__(
        self, directory: Path, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ):
        self.directory = Path(directory)
        self.layout = [(name, tuple(shape), dtype) for name, shape, dtype in layout]
        self.shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(self.layout):
            nbytes = _nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(i)
            size += nbytes
        count = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        )
        self.shard_of = {self.layout[i][0]: k for k, shard in enumerate(self.shards) for i in shard}
        self.next, self.handle, self.open_shard = 0, None, -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the layout (its name must be the next one; cast to the layout's dtype)."""
        if self.next >= len(self.layout) or self.layout[self.next][0] != name:
            expected = self.layout[self.next][0] if self.next < len(self.layout) else "nothing more"
            raise AssertionError(f"safetensors writer: got {name}, expected {expected}")
        _, shape, dtype = self.layout[self.next]
        if tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: shape {tuple(tensor.shape)}, the layout says {shape}")
        shard = self.shard_of[name]
        if shard != self.open_shard:
            self._open(shard)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        if data.numel():
            self.handle.write(data.view(torch.uint8).numpy().data)
        self.next += 1

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[shard]:
            name, shape, dtype = self.layout[i]
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % _HEADER_ALIGN)
        self.handle = open(self.directory / self.files[shard], "wb")  # noqa: SIM115  (closed by the next shard/close)
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.open_shard = shard

    def close(self) -> list[str]:
        if self.next != len(self.layout):
            raise AssertionError(f"safetensors writer: {len(self.layout) - self.next} tensors never written")
        if self.handle is not None:
            self.handle.close()
        if len(self.files) > 1:
            total = sum(_nbytes(shape, dtype) for _, shape, dtype in self.layout)
            weight_map = {name: self.files[k] for name, k in self.shard_of.items()}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


def write_safetensors(directory: Path, tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[str]:
    """Write planned tensors through a `ShardWriter`, each made only when its turn comes."""
    writer = ShardWriter(directory, [(p.name, p.shape, p.dtype) for p in tensors], max_shard_bytes)
    for planned in tensors:
        writer.write(planned.name, planned.make())
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
    with torch.device("meta"):
        skeleton = model_cls(config)  # shapes only: the code files and auto_map come from its class
    with directory_in_place(out) as partial:
        if getattr(model_cls, "_auto_class", None) is not None:
            custom_object_save(skeleton, partial, config=config)
        config.architectures = [type(skeleton).__name__]  # as `save_pretrained` records it
        config.save_pretrained(partial)
        write_weights(partial)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, partial)
    return Path(out)


def saved_keys(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of what `save_pretrained` writes for `model` (a meta skeleton is enough): its state
    dict without the tied copy of the input embeddings."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def save_model(model, out: Path, tokenizer=None) -> Path:
    """Save weights (safetensors), config with auto_map, the remote modeling code and the tokenizer.

    Written next to `out` and renamed into place, so `out/config.json` existing means the directory is whole (a
    kill during the export leaves the previous directory, or none)."""
    with directory_in_place(out) as partial:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    return Path(out)
