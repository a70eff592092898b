"""`layermoe profile`: load a model directory and held-out text, profile every layer, write `similarity.json`.

Under `deepspeed`/`torchrun`/`mpirun` (WORLD_SIZE > 1) each rank profiles every world_size-th row and the sums are
all-reduced, so the result does not depend on the number of ranks; rank 0 writes the files.
"""

from __future__ import annotations

import logging
import os
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
from layermoe_ds.settings import ProfileSettings

log = logging.getLogger(__name__)


def distributed_context(backend: str, device: str, timeout_minutes: float = 30.0) -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed (on `backend`) when launched with several ranks."""
    adopt_launcher_env()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    return init_process_group(backend, device, timeout_minutes)


def run_profile(settings: ProfileSettings) -> dict:
    """`layermoe profile`: Eq. 8-9 on the first `tokens_per_lang` tokens of each language, split over the ranks of
    a launcher; writes `out` (and `plot`) on rank 0 and returns the report (every rank)."""
    s, model_dir = settings, Path(settings.model)
    check_model_dir(model_dir)
    seq_len = seq_len_for(model_config(model_dir), s.seq_len, 256, "profile --seq-len")  # default: 256 within it
    langs, split = [*s.old, *s.new], str(s.split)
    tokenizer_dir = Path(s.tokenizer) if s.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    streams = open_streams(Path(s.data), tokenizer, tokenizer_dir, langs, split)
    batches = profile_blocks(streams, s.tokens_per_lang, seq_len, tokenizer.pad_token_id)
    short = {lang: n for lang, n in batches.tokens.items() if n < s.tokens_per_lang}
    if short:
        message = f"profile: fewer tokens than --tokens-per-lang {s.tokens_per_lang} in the {split} split: {short}"
        if s.strict:
            raise InputError(message + " (--strict)")
        log.warning("%s; profiling what there is", message)
    adopt_launcher_env()  # LOCAL_RANK first: it picks this rank's GPU
    device, backend = device_and_backend(s.device or None)
    rank, world = distributed_context(backend, device)
    model = load_causal_lm(model_dir, parse_dtype(str(s.dtype)), device)
    acc = profile_model(model, batches, s.batch_size, rank, world)
    extra = {"split": split, "seq_len": seq_len, "dtype": str(s.dtype), "tokens_per_lang_requested": s.tokens_per_lang,
             "world_size": world}  # fmt: skip
    report = similarity_report(acc, langs, s.old, s.new, batches.tokens, str(model_dir), s.seed, extra)
    if rank == 0:
        write_json(Path(s.out), report)
        if s.plot:
            plot_similarity(report, Path(s.plot))
    return report
