"""The project's error classes, and what the command line adds to a real failure.

`InputError` is bad input — a file, field, flag or value the user gave — raised before any work is lost and shown
as one line naming what is wrong (exit 2). It subclasses `ValueError` (its missing-file and existing-output kinds
also `FileNotFoundError` and `FileExistsError`), so code and tests that catch those keep working. Everything else
is a real failure: it keeps its traceback and exits non-zero, with one hint line where the remedy is known (a CUDA
out-of-memory names the memory knobs, a process-group timeout names `dist_timeout_minutes`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input, named in the message: one line at the command line, exit 2."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory the user named is not there."""


class OutputExistsError(InputError, FileExistsError):
    """An output the user named exists and would be overwritten."""


class OutputWriteError(RuntimeError):
    """A checkpoint or a stage's exported model could not be written (disk full, quota, permissions): the run stops
    with one line that says what is intact, nothing is marked."""


class StepFailed(RuntimeError):
    """A subprocess this command ran failed; its own log has the traceback (one line here, exit 1)."""


OOM_HINT = (
    "hint: out of GPU memory: lower train_micro_batch_size_per_gpu in the DeepSpeed JSON (raise "
    "gradient_accumulation_steps to keep the batch), turn on activation_checkpointing, or use ZeRO stage 2 "
    "(ds_configs/stage1_zero2.json); see docs/sizing.md"
)
TIMEOUT_HINT = (
    "hint: a collective timed out or the process group failed: a rank may have died or stalled (see every rank's "
    "log); for slow steps or saves raise dist_timeout_minutes (the run config, or --dist-timeout-minutes)"
)
_TIMEOUT = re.compile(r"NCCL|timed? ?out|Timeout|ProcessGroup|Watchdog", re.IGNORECASE)


def failure_hint(exc: BaseException) -> str | None:
    """The hint line for a real failure whose remedy is known, or None."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc):
        return OOM_HINT
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    if isinstance(exc, backend_error) or (isinstance(exc, RuntimeError) and _TIMEOUT.search(str(exc))):
        return TIMEOUT_HINT
    return None


def reported(
    body: Callable[[], int | None], debug: bool, error_prefix: Callable[[BaseException], str | None], hint_prefix: str
) -> int:
    """A command's exit code, the one place errors become one: bad input is one line and 2, a failed step or
    checkpoint write one line and 1 (`error_prefix(exc)` begins the line; None: this process stays quiet), and
    anything else keeps its traceback with the remedy where one is known. `debug` re-raises everything."""
    try:
        return int(body() or 0)
    except (InputError, StepFailed, OutputWriteError) as exc:
        if debug:
            raise
        prefix = error_prefix(exc)
        if prefix is not None:
            print(f"{prefix}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    except Exception as exc:  # a real failure: its traceback, and the remedy where one is known
        hint = failure_hint(exc)
        if hint:
            print(f"{hint_prefix}: {hint}", file=sys.stderr)
        raise
