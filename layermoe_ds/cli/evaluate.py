"""`layermoe evaluate` and `layermoe lm-eval-tasks`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
from pathlib import Path

from layermoe_ds.cli.common import add_settings, lang_list, settings_of
from layermoe_ds.settings import BenchmarkSettings, EvalSettings


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-language held-out loss, perplexity, bits per byte and routing statistics",
        description="Evaluate a dense HF model, a LayerMoE model, a DeepSpeed checkpoint (RUN/checkpoints/step_N) "
        "or a run directory (its newest complete checkpoint) on held-out text. Every token is scored once; LayerMoE "
        "models also report, per layer and language, the share of tokens routed to expert 0, the expert load and "
        "the classifier accuracy.",
    )
    add_settings(p, EvalSettings)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from layermoe_ds.eval.evaluate import run_evaluation

    run_evaluation(settings_of(args, EvalSettings))
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
    add_settings(p, BenchmarkSettings)
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args) -> int:
    from layermoe_ds.eval.benchmark import markdown, run_benchmark

    settings = settings_of(args, BenchmarkSettings)
    report = run_benchmark(settings)
    if settings.dry_run:
        for lang, rows in report["plan"].items():
            print(f"{lang}: " + ", ".join(f"{row['task']} ({row['num_fewshot']}-shot)" for row in rows))
    else:
        print(markdown(report), end="")
    print(f"written to {Path(settings.out) / 'results.json'}")
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
