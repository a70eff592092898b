"""`layermoe evaluate` and `layermoe lm-eval-tasks`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
from pathlib import Path

from layermoe_ds.cli.common import lang_list
from layermoe_ds.errors import InputError
from layermoe_ds.flags import count, positive


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
    p.add_argument("--seq-len", type=count(), default=None, help="window length (default: 1024, or a shorter context)")
    p.add_argument("--batch-size", type=count(), default=8)
    p.add_argument("--max-tokens", type=count(), default=None, help="per language (default: the whole split)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU when there is one, else cpu)"
    )
    p.add_argument("--dist-timeout-minutes", type=positive, default=30.0, help="process-group timeout under a launcher")
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


def add_benchmark(sub) -> None:
    p = sub.add_parser(
        "benchmark",
        help="the paper's benchmarks per language (ARC, HellaSwag, MMLU, Belebele via lm-eval; FLORES translation)",
        description="Run the paper's lm-eval protocol per language — ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU "
        "5-shot (mmlu_tr 4-shot), Belebele 5-shot — plus any --tasks, and with --flores its FLORES translation "
        "(8-shot from dev, beam 6, chrF; COMET with --comet), on a dense or LayerMoE model; write OUT/results.json "
        "(plan, scores, Old/New averages, missing tasks) and OUT/results.md. Needs the [eval] extra.",
    )
    p.add_argument("--model", type=Path, required=True, help="model directory (dense or LayerMoE)")
    p.add_argument("--old", type=lang_list, required=True, help="old languages, e.g. en,zh,es")
    p.add_argument("--new", type=lang_list, required=True, help="new languages, e.g. el,hu,tr")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    p.add_argument("--suite", default="paper", choices=("paper", "none"), help="the paper's benchmarks, or none")
    p.add_argument(
        "--tasks", type=lang_list, default=[], help="more lm-eval tasks per language: my_mc_{lang} or my_mc_{lang}:3"
    )
    p.add_argument("--include-path", type=Path, default=None, help="a directory of your own lm-eval task YAMLs")
    p.add_argument("--datasets", type=Path, default=None, help="local dataset snapshots, DIR/<hub repository>")
    p.add_argument(
        "--limit",
        type=count(),
        default=None,
        help="documents per task and sentences per FLORES direction (a quick look, not a score)",
    )
    p.add_argument("--batch-size", type=count(), default=1)
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    p.add_argument("--dry-run", action="store_true", help="write the plan and the missing tasks; run no model")
    p.add_argument("--flores", type=Path, default=None, help="a FLORES-101/200 directory (dev/, devtest/): "
                   "translation to and from English per language, chrF")  # fmt: skip
    p.add_argument("--flores-shots", type=count(), default=8, help="dev examples in each translation prompt")
    p.add_argument("--beams", type=count(), default=6, help="beam width of the translations")
    p.add_argument("--flores-max-new-tokens", type=count(), default=256, help="longest translation generated")
    p.add_argument("--comet", type=Path, default=None, help="a local COMET checkpoint (model.ckpt): COMET beside "
                   "chrF (pip install unbabel-comet)")  # fmt: skip
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args) -> int:
    from layermoe_ds.eval.benchmark import FloresOptions, markdown, run_benchmark

    flores = None
    if args.flores is not None:
        flores = FloresOptions(args.flores, args.flores_shots, args.beams, args.flores_max_new_tokens, args.comet)
    elif args.comet is not None:
        raise InputError("benchmark --comet: scores translations; give --flores DIR as well")
    report = run_benchmark(
        args.model,
        args.old,
        args.new,
        args.out,
        args.suite,
        args.tasks,
        args.include_path,
        args.datasets,
        args.limit,
        args.batch_size,
        args.device,
        args.dtype,
        args.dry_run,
        flores,
    )
    if args.dry_run:
        for lang, rows in report["plan"].items():
            print(f"{lang}: " + ", ".join(f"{row['task']} ({row['num_fewshot']}-shot)" for row in rows))
    else:
        print(markdown(report), end="")
    print(f"written to {args.out / 'results.json'}")
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
