"""The experiment's one caching idiom: a step's output is reused only while the step's inputs are unchanged.

Each step (profile, allocate, grow, a training stage, an evaluation) writes its output (a file or a directory) and,
beside it, `<output>.step.json`: the fingerprint of its inputs (settings, and the fingerprints of the steps it reads
from), whether it finished, and its wall time. A rerun with the same fingerprint reuses a finished output; a changed
preset, allocation, base model or corpus changes the fingerprint, and the step (and every step downstream of it,
whose inputs hold this one's fingerprint) runs again. A resumable step (training, which checkpoints) that was killed
part-way is resumed, not restarted, while its fingerprint is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from layermoe_ds.io import read_json, write_json

_FINISHED_ONLY = ContextVar("finished_steps_only", default=False)


class NotFinished(Exception):
    """A step asked for under `finished_steps_only` that has not finished with these inputs."""


@contextmanager
def finished_steps_only() -> Iterator[None]:
    """Within it `cached` returns finished steps and raises `NotFinished` for any other, writing and removing nothing:
    what `layermoe experiment --report-only` reads a report from, beside a run still training."""
    token = _FINISHED_ONLY.set(True)
    try:
        yield
    finally:
        _FINISHED_ONLY.reset(token)


def fingerprint(inputs: object) -> str:
    """A short stable digest of JSON-able `inputs` (key order does not matter)."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def step_record(output: Path) -> Path:
    return output.parent / f"{output.name}.step.json"


def cached(output: Path, inputs: dict, produce: Callable[[], object], resumable: bool = False) -> str:
    """Run `produce()` (which writes `output`) unless a finished run with these `inputs` is recorded; return the
    fingerprint, for the steps that read `output` to put in their own inputs."""
    record_file, digest = step_record(output), fingerprint(inputs)
    record = read_json(record_file, "experiment step record") if record_file.is_file() else None
    same = record is not None and record.get("fingerprint") == digest
    if same and record.get("done") and output.exists():
        return digest
    if _FINISHED_ONLY.get():
        raise NotFinished(output)
    if not (same and resumable):  # stale, or an unfinished step that cannot resume: start it clean
        _remove(output)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(record_file, {"fingerprint": digest, "done": False, "inputs": inputs})
    started = time.perf_counter()
    produce()
    if not output.exists():
        raise RuntimeError(f"experiment step finished without writing {output}")
    seconds = round(time.perf_counter() - started, 1)  # a resumed step: this attempt's time only
    write_json(record_file, {"fingerprint": digest, "done": True, "seconds": seconds, "inputs": inputs})
    return digest


def step_seconds(output: Path) -> float | None:
    """Wall seconds a finished step took (None if it has not finished)."""
    record_file = step_record(output)
    if not record_file.is_file():
        return None
    record = read_json(record_file, "experiment step record")
    return record.get("seconds") if record.get("done") else None


def directory_manifest(path: Path) -> dict:
    """What identifies a model or corpus directory for caching: its small JSON descriptors' contents and its large
    files' names, sizes and modification times (not their hashes: the base of a real run is gigabytes)."""
    path = Path(path)
    manifest: dict = {"path": str(path.resolve())}
    for name in ("config.json", "manifest.json", "pretrain_done.json"):
        if (path / name).is_file():
            manifest[name] = fingerprint(read_json(path / name, f"{path / name}"))
    for file in sorted(path.glob("*")):
        if file.suffix in (".safetensors", ".bin", ".txt", ".model") and file.is_file():
            stat = file.stat()
            manifest[file.name] = [stat.st_size, stat.st_mtime_ns]
    return manifest


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
