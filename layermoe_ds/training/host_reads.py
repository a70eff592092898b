"""Counting the operations that read device values on the host (each one a GPU→CPU synchronisation): the CPU cannot
queue work ahead of the GPU past any of them. Counted on CPU as well, where they cost nothing, so a test can hold
the hot path to its budget without a GPU.

What counts: `.item()`, `int()`, `float()`, `bool()` of a tensor (all `aten._local_scalar_dense`), `.tolist()`, and
the operations whose output shape depends on the data (`nonzero`, boolean-mask indexing and assignment,
`masked_select`, `unique`, `bincount`, `repeat_interleave` by a tensor of counts).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from layermoe_ds.io import write_json

aten = torch.ops.aten

_DATA_SHAPED = {
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.argwhere.default: "nonzero",
}


_TORCH = str(Path(torch.__file__).parent)


def _caller() -> str:
    """The innermost frame outside torch and this module, the line that asked for the read, as its path from the
    import root: `transformers/masking_utils.py:761`, `layermoe_ds/ds/moe_layer.py:136`."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH) and frame.filename != __file__:
            roots = [r for r in sys.path if r and frame.filename.startswith(r.rstrip("/") + "/")]
            name = frame.filename[len(max(roots, key=len).rstrip("/")) + 1 :] if roots else frame.filename
            return f"{name}:{frame.lineno}"
    return "?"


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads: ...`; then `reads.total` and `reads.counts` (operation → count). Counts every
    thread's tensor operations that pass through this one (autograd's backward on CPU runs in the caller's thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()  # "file:line (operation)" → count
        self._tolist = None

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        self.sites[f"{_caller()} ({kind})"] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self._count("item")
        elif func in _DATA_SHAPED:
            self._count(_DATA_SHAPED[func])
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _bool_index(args):
            self._count("boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist

        def tolist(tensor):  # reads the tensor's data directly, below the dispatcher
            self._count("tolist")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


HOST_READS = "host_reads.json"


class HostReadSections:
    """The host reads of named sections of a step, while `enabled` (a no-op context otherwise): `with
    sections("micro_step"): …`, then `write` (every rank takes part; rank 0 writes)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: dict[str, dict[str, int]] = {}
        self.sites: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, when: bool = True) -> Iterator[None]:
        if not (self.enabled and when):
            yield
            return
        with HostReads() as reads:
            yield
        self.counts[name] = {"total": reads.total, **dict(sorted(reads.counts.items()))}
        self.sites[name] = dict(reads.sites.most_common())

    def write(self, path: Path, moe_layers: int, step: int) -> None:
        """OUT/host_reads.json: each rank's counts by section and operation, and the MoE layer count (the budget of
        the expert-parallel micro-step is one read a layer), and where each read was asked for (file:line)."""
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, {"counts": self.counts, "sites": self.sites})
        if dist.get_rank() == 0:
            counts, sites = [r["counts"] for r in ranks], [r["sites"] for r in ranks]
            write_json(path, {"step": step, "moe_layers": moe_layers, "ranks": counts, "sites": sites})
