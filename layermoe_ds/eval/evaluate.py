"""`layermoe evaluate`: one model — a dense HF directory, a LayerMoE directory or a DeepSpeed checkpoint — on
held-out text: per-language loss, perplexity and bits per byte, Old-avg/New-avg, and for LayerMoE models the routing
statistics per layer and language (eval/routing.py). One JSON layout for the CLI, the demo and the experiments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from layermoe_ds.data.streams import open_streams
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.data.tokens import TokenStream
from layermoe_ds.distributed import adopt_launcher_env, device_and_backend
from layermoe_ds.ds.process import init_process_group
from layermoe_ds.errors import InputError
from layermoe_ds.eval.perplexity import evaluate_languages, format_table, group_averages
from layermoe_ds.eval.routing import RoutingStats, format_routing
from layermoe_ds.hf.load import parse_dtype, seq_len_for
from layermoe_ds.hf.sources import check_source, load_model
from layermoe_ds.io import write_json
from layermoe_ds.modeling.lm_loss import check_fused_loss
from layermoe_ds.modeling.types import is_layermoe
from layermoe_ds.settings import EvalSettings, path_or_none


def language_groups(langs: Sequence[str], old: Sequence[str], groups: Sequence[Sequence[str]] | None) -> dict[str, int]:
    """language → group index: from explicit lifelong groups, else old languages 0 and the rest 1."""
    if groups:
        index = {lang: g for g, members in enumerate(groups) for lang in members}
        missing = [lang for lang in langs if lang not in index]
        if missing:
            raise InputError(f"groups: {missing} are evaluated but in no group of {list(map(list, groups))}")
        return {lang: index[lang] for lang in langs}
    return {lang: 0 if lang in old else 1 for lang in langs}


def evaluate_model(
    model,
    tokenizer,
    streams: dict[str, TokenStream],
    groups: dict[str, int],
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict:
    """{"languages": {lang: {loss, ppl, bpb, tokens, bytes}}, "old_avg", "new_avg", "routing" (LayerMoE only)}."""
    routing = RoutingStats(groups) if is_layermoe(model) else None
    results = evaluate_languages(model, tokenizer, streams, seq_len, batch_size, max_tokens, routing)
    old = [lang for lang in streams if groups[lang] == 0]
    new = [lang for lang in streams if groups[lang] > 0]
    report = {"languages": results, **group_averages(results, old, new)}
    if routing is not None:
        report["routing"] = routing.result()
    return report


def format_report(report: dict, groups: dict[str, int]) -> str:
    old = [lang for lang, g in groups.items() if g == 0]
    new = [lang for lang, g in groups.items() if g > 0]
    text = format_table(report["languages"], old, new)
    if "routing" in report:
        text += "\n\nrouting (share of tokens whose top route is expert 0; classifier accuracy)\n"
        text += format_routing(report["routing"], old, new)
    return text


def run_evaluation(settings: EvalSettings) -> dict:
    """`layermoe evaluate`: a model directory, checkpoint or run directory on a split of some languages. Under a
    launcher (deepspeed, torchrun, mpirun) the ranks share the windows; rank 0 prints the tables and writes `out`.
    Returns the report (every rank)."""
    s = settings
    source, split = Path(s.model), str(s.split)
    index = language_groups(s.langs, s.old, s.groups or None)
    check_source(source)
    adopt_launcher_env()
    device, backend = device_and_backend(s.device or None)
    model, tokenizer_dir, described = load_model(source, parse_dtype(str(s.dtype)), device, path_or_none(s.base))
    seq_len = seq_len_for(model.config, s.seq_len, 1024, "evaluate --seq-len")  # default: 1,024 within the context
    check_fused_loss(model, f"evaluate --model {source}")  # the perplexities go through the fused head
    tokenizer = load_tokenizer(tokenizer_dir)
    streams = open_streams(Path(s.data), tokenizer, tokenizer_dir, s.langs, split)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, _ = init_process_group(backend, device, s.dist_timeout_minutes)
    report = evaluate_model(model, tokenizer, streams, index, seq_len, s.batch_size, s.max_tokens)
    if rank == 0:
        print(f"{described}, {split} split, {device}:")
        print(format_report(report, index))
        if s.out:
            write_json(Path(s.out), {"model": described, "split": split, "groups": index, **report})
    return report
