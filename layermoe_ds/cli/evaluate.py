"""`layermoe evaluate` and `layermoe lm-eval-tasks`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
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
    from layermoe_ds.eval.evaluate import run_evaluation

    run_evaluation(
        args.model,
        args.data,
        args.langs,
        args.old,
        parse_groups(args.groups, "--groups") if args.groups else None,
        args.split,
        args.seq_len,
        args.batch_size,
        args.max_tokens,
        args.dtype,
        args.device,
        args.base,
        args.dist_timeout_minutes,
        args.out,
    )
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
