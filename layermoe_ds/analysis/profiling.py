"""`layermoe profile`: load a model directory and held-out text, profile every layer, write `similarity.json`.

Under `deepspeed`/`torchrun`/`mpirun` (WORLD_SIZE > 1) each rank profiles every world_size-th row and the sums are
all-reduced, so the result does not depend on the number of ranks; rank 0 writes the files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from layermoe_ds.analysis.plots import plot_similarity
from layermoe_ds.analysis.similarity import profile_blocks, profile_model, similarity_report
from layermoe_ds.data.streams import open_streams
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.distributed import adopt_launcher_env, device_and_backend
from layermoe_ds.ds.process import init_process_group
from layermoe_ds.errors import InputError
from layermoe_ds.hf.load import check_model_dir, load_causal_lm, parse_dtype, seq_len_for
from layermoe_ds.io import write_json
from layermoe_ds.modeling.types import model_config

log = logging.getLogger(__name__)


def distributed_context(backend: str, device: str, timeout_minutes: float = 30.0) -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed (on `backend`) when launched with several ranks."""
    adopt_launcher_env()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    return init_process_group(backend, device, timeout_minutes)


def check_languages(old: Sequence[str], new: Sequence[str]) -> None:
    if not old or not new:
        raise InputError("profile: give at least one old (--old) and one new (--new) language")
    both = sorted(set(old) & set(new))
    if both:
        raise InputError(f"profile: {both} listed as both old and new")
    for name, langs in (("--old", old), ("--new", new)):
        if len(set(langs)) != len(langs):
            raise InputError(f"profile: {name} lists a language twice: {list(langs)}")


def run_profile(
    model_dir: Path,
    data: Path,
    old: Sequence[str],
    new: Sequence[str],
    tokens_per_lang: int,
    out: Path,
    plot: Path | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    split: str = "valid",
    dtype: str = "float32",
    device: str | None = None,
    strict: bool = False,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
) -> dict:
    check_languages(old, new)
    if tokens_per_lang < 1 or (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise InputError("profile: --tokens-per-lang, --seq-len and --batch-size must be >= 1")
    check_model_dir(model_dir)
    seq_len = seq_len_for(model_config(model_dir), seq_len, 256, "profile --seq-len")  # default: 256 within it
    langs = [*old, *new]
    tokenizer_dir = tokenizer_dir or model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    streams = open_streams(data, tokenizer, tokenizer_dir, langs, split)
    batches = profile_blocks(streams, tokens_per_lang, seq_len, tokenizer.pad_token_id)
    short = {lang: n for lang, n in batches.tokens.items() if n < tokens_per_lang}
    if short:
        message = f"profile: fewer tokens than --tokens-per-lang {tokens_per_lang} in the {split} split: {short}"
        if strict:
            raise InputError(message + " (--strict)")
        log.warning("%s; profiling what there is", message)
    adopt_launcher_env()  # LOCAL_RANK first: it picks this rank's GPU
    device, backend = device_and_backend(device)
    rank, world = distributed_context(backend, device)
    model = load_causal_lm(model_dir, parse_dtype(dtype), device)
    acc = profile_model(model, batches, batch_size, rank, world)
    report = similarity_report(
        acc,
        langs,
        old,
        new,
        batches.tokens,
        model_id=str(model_dir),
        seed=seed,
        extra={
            "split": split,
            "seq_len": seq_len,
            "dtype": dtype,
            "tokens_per_lang_requested": tokens_per_lang,
            "world_size": world,
        },
    )
    if rank == 0:
        write_json(out, report)
        if plot is not None:
            plot_similarity(report, plot)
    return report
