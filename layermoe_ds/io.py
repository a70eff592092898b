"""Small file helpers shared by every step: atomic writes, JSON reading with clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from layermoe_ds.errors import InputError, MissingInputError


@contextlib.contextmanager
def atomic_output(path: Path, binary: bool = False):
    """A file to stream into (text, or bytes with `binary`): it appears at `path` complete when the block ends, or
    not at all — a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would leave the file unreadable to a shared team
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: Path) -> None:
    """Give the files under `directory` the mode the umask asks for: writers such as transformers'
    `save_pretrained` create weights 0600, which a teammate cannot read."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path, binary=True) as f:
        f.write(data)


@contextlib.contextmanager
def directory_in_place(out: Path):
    """A directory to build next to `out`, renamed into place when the block succeeds (removed when it fails): a
    reader sees the previous directory, or none, or the complete new one, never a torn one. Its files get the
    modes the umask asks for, whatever wrote them (`save_pretrained` writes weights 0600)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        honour_umask(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(previous)
        partial.rename(out)
        shutil.rmtree(previous)
    else:
        partial.rename(out)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: {path} is not valid JSON ({exc})") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
