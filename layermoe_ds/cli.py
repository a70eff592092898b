"""`layermoe <verb>`: the command line of layermoe_ds. Each verb parses its options and calls the library."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from layermoe_ds.distributed import leave_process_group

log = logging.getLogger("layermoe")

DEFAULT_CACHE = Path.home() / ".cache" / "layermoe_ds" / "debs"


def lang_list(text: str) -> list[str]:
    langs = [part.strip() for part in text.split(",") if part.strip()]
    if not langs:
        raise argparse.ArgumentTypeError(f"{text!r} names no language (expected e.g. en,de)")
    return langs


# --- data -------------------------------------------------------------------------------------------------------


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build the embedded corpus; tokenize text once into memory-mapped shards")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    b = verbs.add_parser(
        "build",
        help="fetch Debian libreoffice-help-* packages and extract a parallel corpus",
        description="Build data/<lang>.{train,valid,test}.txt and data/manifest.json from Debian's "
        "libreoffice-help-* packages (MPL-2.0), split by page ≈ 90/5/5.",
    )
    b.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: data)")
    b.add_argument("--langs", type=lang_list, default=None, help="languages (default: en,de,fr,ru,el,es,it; also zh)")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where .deb files are kept ({DEFAULT_CACHE})")
    b.add_argument("--max-pages", type=int, default=None, help="a deterministic slice of help pages (tests)")
    b.add_argument("--min-chars", type=int, default=24, help="drop paragraphs shorter than this (default: 24)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching corpus exists")
    b.set_defaults(func=_cmd_data_build)
    t = verbs.add_parser(
        "tokenize",
        help="tokenize raw text once into memory-mapped token shards (what every later step reads)",
        description="Stream the raw files of --data (a directory of <lang>.<split>.txt/.jsonl or one jsonl), "
        "tokenize them in worker processes and write per language and split: token shards (uint16 ids when the "
        "vocabulary fits, else uint32), a document index and token_manifest.json (sources' sizes and SHA-256, the "
        "tokenizer's fingerprint, counts). Give OUT as `data:` of any step. A killed run: run it again.",
    )
    t.add_argument("--data", type=Path, required=True, help="raw data directory or jsonl")
    t.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer (or model) directory")
    t.add_argument("--out", type=Path, required=True, help="the prepared directory to write")
    t.add_argument("--langs", type=lang_list, default=None, help="languages (default: every one in --data)")
    t.add_argument("--splits", type=lang_list, default=None, help="e.g. train,valid (default: every split found)")
    t.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPUs, at most 8)")
    t.add_argument("--chunk-mb", type=float, default=32.0, help="input MB a worker takes at a time (default: 32)")
    t.set_defaults(func=_cmd_data_tokenize)
    v = verbs.add_parser(
        "verify", help="check every shard of a prepared directory against its manifest (sizes, SHA-256)"
    )
    v.add_argument("prepared", type=Path)
    v.set_defaults(func=_cmd_data_verify)


def _cmd_data_build(args) -> int:
    from layermoe_ds.data.corpus import DEFAULT_LANGS, CorpusOptions, build_corpus, corpus_is_built

    options = CorpusOptions(
        langs=tuple(args.langs or DEFAULT_LANGS), min_chars=args.min_chars, max_pages=args.max_pages
    )
    if not args.force and corpus_is_built(args.out, options):
        log.info("corpus in %s is up to date (use --force to rebuild)", args.out)
        return 0
    manifest = build_corpus(args.out, args.cache, options)
    for name, meta in manifest["files"].items():
        print(f"{name:<16} {meta['paragraphs']:>7} paragraphs {meta['bytes'] / 1e6:>7.2f} MB")
    return 0


def _cmd_data_tokenize(args) -> int:
    from layermoe_ds.data.loading import available_languages, raw_sources
    from layermoe_ds.data.prepare import default_workers, tokenize

    if args.data.is_file():  # one jsonl: its records say language and split
        sources = raw_sources(args.data, [], [])
    else:
        found = available_languages(args.data)
        langs = args.langs or sorted(found)
        sources = [
            source
            for lang in langs
            for source in raw_sources(args.data, [lang], args.splits or sorted(found.get(lang, {})))
        ]
    manifest = tokenize(
        sources,
        args.tokenizer,
        args.out,
        workers=args.workers or default_workers(),
        langs=args.langs,
        splits=args.splits,
        chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
    )
    for lang, splits in sorted(manifest["streams"].items()):
        for split, entry in sorted(splits.items()):
            print(f"{lang:<8} {split:<6} {entry['documents']:>9} documents {entry['tokens']:>12} tokens")
    totals, run = manifest["totals"], manifest["run"]
    speed = f"{run['mb_per_s']:.2f} MB/s with {run['workers']} workers" if run.get("mb_per_s") else "nothing to do"
    if manifest.get("up_to_date"):
        speed = "up to date, nothing to do"
    print(
        f"{totals['tokens']} tokens ({manifest['dtype']}), {totals['disk_bytes'] / 1e6:.1f} MB on disk "
        f"({totals['disk_bytes_per_token']} bytes a token with the index); {speed}; manifest: "
        f"{args.out / 'token_manifest.json'}"
    )
    return 0


def _cmd_data_verify(args) -> int:
    from layermoe_ds.data.prepare import verify

    print(f"{args.prepared}: {verify(args.prepared)} shards match the manifest")
    return 0


# --- tokenizer ---------------------------------------------------------------------------------------------------


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    verbs = p.add_subparsers(dest="tokenizer_verb", required=True)
    t = verbs.add_parser(
        "train", help="byte-fallback SentencePiece over old and new languages, saved for AutoTokenizer.from_pretrained"
    )
    t.add_argument("--data", type=Path, required=True, help="data directory or jsonl")
    t.add_argument("--langs", type=lang_list, default=None, help="languages (default: all in --data)")
    t.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default: 8000)")
    t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    t.add_argument("--out", type=Path, required=True, help="output directory")
    t.set_defaults(func=_cmd_tokenizer_train)


def _cmd_tokenizer_train(args) -> int:
    from layermoe_ds.data.loading import available_languages
    from layermoe_ds.data.tokenizer import train_tokenizer

    langs = args.langs or sorted(available_languages(args.data))
    train_tokenizer(args.data, langs, args.out, args.vocab, args.model_type)
    print(f"tokenizer ({args.vocab} pieces, {','.join(langs)}) saved to {args.out}")
    return 0


# --- pretrain ----------------------------------------------------------------------------------------------------


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the tiny dense base model on the old languages",
        description="Train a small HF Llama/Qwen2 model from scratch (seeded, fixed steps, resumable: "
        "run the same command again after a kill).",
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument(
        "--preset",
        choices=("demo", "deep"),
        default=None,
        help="start from a preset (demo: 4 layers × 128, the demo's base; deep: 12 layers × 128, the paper "
        "preset's base; both en,de + 8%% fr,ru,el,es,it), then --config, then the flags below",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON with PretrainConfig fields")
    p.add_argument("--langs", type=lang_list, default=None, help="old languages (default: en,de)")
    p.add_argument(
        "--low-resource-langs",
        type=lang_list,
        default=None,
        help="languages the model sees only a little of (a real LLM has seen a little of most)",
    )
    p.add_argument(
        "--low-resource-share",
        type=float,
        default=None,
        help="their share of the training blocks, e.g. 0.05 (default: 0)",
    )
    p.add_argument("--arch", choices=("llama", "qwen2"), default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="FFN intermediate size")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_pretrain)


def pretrain_config_from_args(args):
    from layermoe_ds.config import PretrainConfig, load_config
    from layermoe_ds.training.pretrain import PRESETS

    overrides = {
        "langs": args.langs,
        "low_resource_langs": args.low_resource_langs,
        "low_resource_share": args.low_resource_share,
        "model.arch": args.arch,
        "model.num_layers": args.layers,
        "model.hidden_size": args.hidden,
        "model.num_heads": args.heads,
        "model.num_kv_heads": args.kv_heads,
        "model.intermediate_size": args.ffn,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "save_every": args.save_every,
        "seed": args.seed,
    }
    return load_config(PretrainConfig, args.config, overrides, PRESETS.get(args.preset))


def _cmd_pretrain(args) -> int:
    from layermoe_ds.training.pretrain import is_done, pretrain

    config = pretrain_config_from_args(args)
    if is_done(args.out, config, args.tokenizer, args.data):
        print(f"base model in {args.out} is up to date")
        return 0
    info = pretrain(config, args.data, args.tokenizer, args.out)
    print(f"base model ({info['parameters']:,} parameters, final loss {info['final_loss']:.3f}) saved to {args.out}")
    return 0


# --- upcycle / grow ----------------------------------------------------------------------------------------------


def _add_upcycle(sub) -> None:
    p = sub.add_parser(
        "upcycle",
        help="dense HF model + allocation.json → LayerMoE model directory",
        description="Layer i gets N_i experts: expert 0 is the original FFN, the new ones copies of "
        "it; a router per MoE layer and a language classifier on the chosen layers. "
        "The result loads with AutoModelForCausalLM(..., trust_remote_code=True).",
    )
    p.add_argument("--model", type=Path, required=True, help="dense HF model directory (Llama, Qwen2, Mistral)")
    p.add_argument("--allocation", type=Path, required=True, help="allocation.json from `layermoe allocate`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=2, help="experts per token (clipped to N_i; default 2)")
    p.add_argument(
        "--classifier",
        choices=("per-token", "prefix-mean"),
        default="per-token",
        help="per-token (the paper) or causal prefix-mean features for the language classifier",
    )
    p.add_argument("--seed", type=int, default=0, help="router/classifier initialisation")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, … (default: the input's)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (default, as the HF hub), 500MB"
    )
    p.set_defaults(func=_cmd_upcycle)


def _refuse_overwrite(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or delete it")


def _cmd_upcycle(args) -> int:
    from layermoe_ds.io import read_json
    from layermoe_ds.modeling.hf_loading import check_model_dir, parse_dtype
    from layermoe_ds.modeling.streaming import parse_size
    from layermoe_ds.modeling.upcycle import upcycle_dir

    _refuse_overwrite(args.out)
    allocation = read_json(args.allocation, "allocation")
    check_model_dir(args.model)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    config = upcycle_dir(
        args.model, allocation, args.out, args.top_k, args.classifier, args.seed, dtype, parse_size(args.max_shard_size)
    )
    print(
        f"LayerMoE model saved to {args.out} ({config.dtype}): experts per layer {config.experts_per_layer}, "
        f"classifier layers {config.classifier_layers} ({config.classifier_mode}), top-{config.moe_top_k}"
    )
    return 0


def _add_grow(sub) -> None:
    p = sub.add_parser(
        "grow",
        help="lifelong expansion: add experts for a new language group",
        description="Existing experts keep their slots and weights (and become old); each layer "
        "gains N_i - 1 new experts (N_i from the new allocation), copies of the original "
        "FFN; classifiers gain one class.",
    )
    p.add_argument("--model", type=Path, required=True, help="an expanded LayerMoE model directory")
    p.add_argument("--allocation", type=Path, required=True, help="allocation for the new language group")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--router",
        choices=("keep", "reinit"),
        default="keep",
        help="keep the old experts' router rows (default), or re-initialise the routers of the layers that gain "
        "experts (the reference)",
    )
    p.add_argument(
        "--classifiers",
        choices=("union", "new"),
        default="union",
        help="classifier layers: the earlier ones plus the new allocation's (default), or the new allocation's "
        "alone (the reference)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, … (default: the input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    p.set_defaults(func=_cmd_grow)


def _cmd_grow(args) -> int:
    from layermoe_ds.io import read_json
    from layermoe_ds.modeling.hf_loading import check_model_dir, parse_dtype
    from layermoe_ds.modeling.streaming import parse_size
    from layermoe_ds.modeling.upcycle import grow_dir

    _refuse_overwrite(args.out)
    allocation = read_json(args.allocation, "allocation")
    check_model_dir(args.model)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    config = grow_dir(
        args.model,
        allocation,
        args.out,
        args.router,
        args.seed,
        dtype,
        parse_size(args.max_shard_size),
        args.classifiers,
    )
    print(
        f"grown model saved to {args.out}: experts per layer {config.experts_per_layer}, "
        f"{config.num_groups} language groups, classifier layers {config.classifier_layers}"
    )
    return 0


# --- export / check-hostfile -------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="DeepSpeed MoE checkpoint → HF LayerMoE directory (no DeepSpeed, no zero_to_fp32)",
        description="Merge mp_rank_00_model_states.pt with every layer_*_expert_* file into one ep_size-1 state "
        "dict and save it as a Hugging Face LayerMoE directory, after checking the checkpoint's files against its "
        "manifest (sizes and SHA-256).",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint directory (RUN/checkpoints/step_N) or a run directory (its newest complete checkpoint)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--base", type=Path, default=None, help="the base model's new location, if it has moved")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.modeling.checkpoint_files import model_from_checkpoint
    from layermoe_ds.modeling.hf_export import save_model
    from layermoe_ds.modeling.hf_loading import parse_dtype

    _refuse_overwrite(args.out)
    model, path, marker = model_from_checkpoint(args.checkpoint, args.base, parse_dtype(args.dtype))
    save_model(model, args.out, load_tokenizer(path))
    print(f"exported {path} (step {marker['step']}) to {args.out}")
    return 0


def _add_check_hostfile(sub) -> None:
    p = sub.add_parser(
        "check-hostfile",
        help="validate a DeepSpeed hostfile before launching ('<host> slots=<N>' per line)",
    )
    p.add_argument("hostfile", type=Path)
    p.set_defaults(func=_cmd_check_hostfile)


def _cmd_check_hostfile(args) -> int:
    from layermoe_ds.distributed import read_hostfile

    hosts = read_hostfile(args.hostfile)
    print(
        f"{args.hostfile}: {len(hosts)} node(s), {sum(hosts.values())} ranks: "
        + ", ".join(f"{host}×{slots}" for host, slots in hosts.items())
    )
    return 0


# --- evaluate ----------------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-language held-out loss, perplexity, bits per byte and routing statistics",
        description="Evaluate a dense HF model, a LayerMoE model, a DeepSpeed checkpoint (RUN/checkpoints/step_N) "
        "or a run directory (its newest complete checkpoint) on held-out text. Every token is scored once; LayerMoE "
        "models also report, per layer and language, the share of tokens routed to expert 0, the expert load and "
        "the classifier accuracy.",
    )
    p.add_argument("--model", type=Path, required=True, help="model directory, checkpoint or run directory")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--langs", type=lang_list, required=True)
    p.add_argument("--old", type=lang_list, default=[], help="old languages (group 0, for Old-avg)")
    p.add_argument("--groups", default=None, help="lifelong language groups in expansion order, e.g. 'en,de;fr,ru;el'")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="per language (default: the whole split)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU when there is one, else cpu)"
    )
    p.add_argument("--dist-timeout-minutes", type=float, default=30.0, help="process-group timeout under a launcher")
    p.add_argument("--base", type=Path, default=None, help="for a checkpoint: its base model's new location")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from layermoe_ds.config import parse_groups
    from layermoe_ds.data.prepare import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.distributed import adopt_launcher_env, device_and_backend, init_process_group
    from layermoe_ds.eval.evaluate import (
        check_source,
        evaluate_model,
        format_report,
        language_groups,
        load_for_evaluation,
    )
    from layermoe_ds.io import write_json
    from layermoe_ds.modeling.hf_loading import parse_dtype

    groups_arg = parse_groups(args.groups, "--groups") if args.groups else None
    groups = language_groups(args.langs, args.old, groups_arg)
    check_source(args.model)
    adopt_launcher_env()  # under deepspeed/torchrun/mpirun the ranks share the windows
    device, backend = device_and_backend(args.device)
    model, tokenizer_dir, described = load_for_evaluation(args.model, parse_dtype(args.dtype), device, args.base)
    tokenizer = load_tokenizer(tokenizer_dir)
    streams = open_streams(args.data, tokenizer, tokenizer_dir, args.langs, args.split)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, _ = init_process_group(backend, device, args.dist_timeout_minutes)
    report = evaluate_model(model, tokenizer, streams, groups, args.seq_len, args.batch_size, args.max_tokens)
    if rank == 0:
        print(f"{described}, {args.split} split, {device}:")
        print(format_report(report, groups))
        if args.out:
            write_json(args.out, {"model": described, "split": args.split, "groups": groups, **report})
    return 0


def _add_lm_eval_tasks(sub) -> None:
    p = sub.add_parser(
        "lm-eval-tasks",
        help="lm-evaluation-harness perplexity tasks over local held-out text (offline)",
        description="Write one loglikelihood_rolling task per language (word/byte perplexity, bits per byte) and a "
        "group `layermoe_heldout` over local files, for `lm_eval --include_path OUT` (install the [eval] extra).",
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--langs", type=lang_list, required=True)
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--out", type=Path, required=True, help="task directory (YAML files + the text as jsonl)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="for prepared --data: the tokenizer that decodes it (default: the one its manifest names)",
    )
    p.set_defaults(func=_cmd_lm_eval_tasks)


def _cmd_lm_eval_tasks(args) -> int:
    from layermoe_ds.eval.lm_harness import command, write_tasks

    names = write_tasks(args.data, args.langs, args.out, args.split, args.tokenizer)
    print(f"wrote {len(names) - 1} tasks and the group {names[-1]} to {args.out}; run them with")
    print(f"  {command(Path('MODEL_DIR'), args.out)}")
    return 0


# --- profile / allocate ------------------------------------------------------------------------------------------


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="layer-wise old/new-language similarity of the FFN input (Eq. 8-9)",
        description="Profile every layer's FFN input on the first T held-out tokens per language "
        "and write similarity.json. Run under deepspeed/torchrun to split the tokens "
        "across ranks.",
    )
    p.add_argument("--model", type=Path, required=True, help="HF model directory (dense or LayerMoE)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--old", type=lang_list, required=True, help="languages the model knows, e.g. en,de")
    p.add_argument("--new", type=lang_list, required=True, help="languages to add, e.g. fr,ru,el")
    p.add_argument("--tokens-per-lang", type=int, default=100_000, help="T (default: 100000, as the reference)")
    p.add_argument("--out", type=Path, required=True, help="similarity.json to write")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the per-layer and per-pair similarity")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="default: valid")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the model directory's")
    p.add_argument("--strict", action="store_true", help="fail instead of warning when a language is short")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from layermoe_ds.analysis.profiling import run_profile

    report = run_profile(
        args.model,
        args.data,
        args.old,
        args.new,
        args.tokens_per_lang,
        args.out,
        args.plot,
        args.seq_len,
        args.batch_size,
        args.split,
        args.dtype,
        args.device,
        args.strict,
        args.seed,
        args.tokenizer,
    )
    print(" ".join(f"{score:.3f}" for score in report["layer_score"]))
    print(f"layer scores ({report['score_rule']}) written to {args.out}")
    return 0


def _add_allocate(sub) -> None:
    p = sub.add_parser(
        "allocate",
        help="experts per layer from similarity (Eq. 10) and classifier layers",
        description="N_i = ceil((1/T_i) / sum_j (1/T_j) * budget), N_i counting the original FFN "
        "(N_i = 1 keeps a layer dense).",
    )
    p.add_argument("--similarity", type=Path, required=True, help="similarity.json from `layermoe profile`")
    p.add_argument("--budget", type=int, default=None, help="total experts over all layers incl. expert 0")
    p.add_argument("--out", type=Path, default=None, help="allocation.json to write")
    p.add_argument("--method", choices=("layermoe", "uniform", "random"), default="layermoe")
    p.add_argument(
        "--classifier-layers",
        default=None,
        help="K (top-K by similarity), last-K, or a list 5,6,10; 0 = none (default: 7, the paper's K, "
        "capped at the number of layers)",
    )
    p.add_argument("--min-experts", type=int, default=1)
    p.add_argument("--max-experts", type=int, default=None)
    p.add_argument("--align", type=int, default=1, help="round new experts per layer up to a multiple of this")
    p.add_argument("--seed", type=int, default=0, help="for --method random")
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="raise layer scores below this to it (recorded); without it a score <= 0 is an error",
    )
    p.add_argument("--plot", type=Path, default=None, help="PNG: scores with the allocation as bars")
    p.add_argument("--sweep", default=None, help="print allocations for several budgets, e.g. 36,72,108")
    p.set_defaults(func=_cmd_allocate)


def _cmd_allocate(args) -> int:
    from layermoe_ds.analysis.allocation import (
        AllocationOptions,
        allocate_from_file,
        scores_from_similarity,
        sweep_table,
    )
    from layermoe_ds.io import read_json, write_json

    common = dict(
        method=args.method,
        classifier_layers=args.classifier_layers,
        min_experts=args.min_experts,
        max_experts=args.max_experts,
        align=args.align,
        seed=args.seed,
        min_score=args.min_score,
    )
    if args.sweep:
        try:
            budgets = [int(b) for b in args.sweep.split(",") if b.strip()]
        except ValueError as exc:
            raise ValueError(f"--sweep: {args.sweep!r} is not a list of integers like 36,72,108") from exc
        sim = read_json(args.similarity, "similarity")
        scores = scores_from_similarity(sim, f"similarity file {args.similarity}", args.min_score is not None)
        print(sweep_table(scores, budgets, AllocationOptions(budget=budgets[0], **common)))
        if args.budget is None:
            return 0
    if args.budget is None or args.out is None:
        raise ValueError("allocate: --budget and --out are required (unless only --sweep is given)")
    if args.out.exists():
        existing = read_json(args.out, "allocation")
        if existing.get("source", {}).get("similarity") not in (None, str(args.similarity)):
            raise FileExistsError(f"allocate: {args.out} was made from another similarity file; choose another --out")
    result = allocate_from_file(args.similarity, AllocationOptions(budget=args.budget, **common))
    write_json(args.out, result)
    if args.plot:
        from layermoe_ds.analysis.plots import plot_similarity

        plot_similarity(read_json(args.similarity, "similarity"), args.plot, result)
    if result.get("floored_layers"):
        print(
            f"note: layers {result['floored_layers']} had scores below --min-score {args.min_score} "
            f"({[round(result['raw_layer_score'][i], 4) for i in result['floored_layers']]}) and were raised to it"
        )
    print(",".join(map(str, result["experts_per_layer"])))
    print(
        f"{result['method']}: Σ N_i = {result['total_experts']} for budget {result['budget']} "
        f"({result['new_experts']} new experts), classifier layers {result['classifier_layers']}"
        + (f", alignment added {result['align_extra_experts']}" if args.align > 1 else "")
    )
    return 0


# --- demo --------------------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the `demo` experiment preset on the embedded corpus, on CPU (cached steps)")
    _experiment_arguments(p, default_out=Path("runs/demo"))
    p.set_defaults(func=_cmd_demo, preset="demo")


def _add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="several systems (baselines, LayerMoE, ablations) on the same data and budget, one report",
        description="Profile once, then per system allocate → stage 1 → stage 2 (deepspeed, 2 CPU ranks) → evaluate; "
        "every finished step is cached so a rerun resumes; writes OUT/report.md, results.json and plots. Without "
        "--base the embedded corpus, tokenizer and tiny base model are built (or reused) first.",
    )
    p.add_argument("--preset", choices=("demo", "full", "paper"), default="demo", help="demo: dense, uniform, "
                   "LayerMoE; full: + dense full fine-tune, random allocation, no classifier, last-K classifiers, "
                   "seeds 0-2 of uniform and LayerMoE, lifelong G0->G1->G2 (es,it) of both; paper: on the 12-layer "
                   "base, the budget-quality curve of uniform, LayerMoE and random at 12/24/36 new experts, the "
                   "ablations and lifelong rows over 3 seeds")  # fmt: skip
    _experiment_arguments(p, default_out=None)
    p.set_defaults(func=_cmd_demo)


def _experiment_arguments(p, default_out: Path | None) -> None:
    p.add_argument(
        "--out", "--runs", dest="runs", metavar="DIR", type=Path, default=default_out, required=default_out is None
    )
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--base", type=Path, default=None, help="a dense base model directory (default: build the tiny one)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)


def _cmd_demo(args) -> int:
    from layermoe_ds.demo import run_demo

    return run_demo(args.data, args.artifacts, args.runs, args.cache, args.preset, args.base)


# --- entry point -------------------------------------------------------------------------------------------------

VERBS: list[Callable] = [
    _add_data,
    _add_tokenizer,
    _add_pretrain,
    _add_profile,
    _add_allocate,
    _add_upcycle,
    _add_grow,
    _add_evaluate,
    _add_lm_eval_tasks,
    _add_export,
    _add_check_hostfile,
    _add_experiment,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layermoe",
        description="LayerMoE multilingual expansion of dense LLMs on DeepSpeed.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        code = int(args.func(args) or 0)
        atexit.register(leave_process_group)  # profile/evaluate under a launcher (its docstring says why)
        return code
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"layermoe {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
