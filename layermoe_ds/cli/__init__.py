"""`layermoe <verb>`: the command line of layermoe_ds. Each verb module parses its options and calls the library."""

from __future__ import annotations

import argparse
import atexit
import logging
from collections.abc import Callable, Sequence

from layermoe_ds.cli import analysis, data, evaluate, experiment, models
from layermoe_ds.distributed import leave_process_group
from layermoe_ds.errors import reported

VERBS: list[Callable] = [
    data.add_data,
    data.add_tokenizer,
    models.add_pretrain,
    models.add_real_base,
    analysis.add_profile,
    analysis.add_allocate,
    models.add_upcycle,
    models.add_grow,
    evaluate.add_evaluate,
    evaluate.add_lm_eval_tasks,
    evaluate.add_benchmark,
    models.add_export,
    models.add_check_hostfile,
    experiment.add_experiment,
    experiment.add_demo,
    experiment.add_calibrate,
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

    def body() -> int:
        code = int(args.func(args) or 0)
        atexit.register(leave_process_group)  # profile/evaluate under a launcher (its docstring says why)
        return code

    return reported(body, args.debug, lambda exc: f"layermoe {args.verb}: error", f"layermoe {args.verb}")
