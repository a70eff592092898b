"""`layermoe evaluate` and `layermoe lm-eval-tasks`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
import os
from pathlib import Path

from layermoe_ds.cli.common import lang_list


def add_evaluate(sub) -> None:
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
    from layermoe_ds.data.streams import open_streams
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


def add_lm_eval_tasks(sub) -> None:
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
