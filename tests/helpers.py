"""Helpers shared by tests."""

import json
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """The environment of a CPU DeepSpeed launch: gloo ranks, one thread each, the checkout importable."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def metrics(run_dir: Path) -> dict[int, dict]:
    """Step → record (a resumed run re-logs steps after its checkpoint: the last record wins)."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records
