"""`layermoe profile` (Eq. 8-9) and `layermoe allocate` (Eq. 10)."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
import os
from pathlib import Path

from layermoe_ds.cli.common import add_settings, settings_of
from layermoe_ds.errors import InputError
from layermoe_ds.flags import count, positive
from layermoe_ds.settings import ProfileSettings


def add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="layer-wise old/new-language similarity of the FFN input (Eq. 8-9)",
        description="Profile every layer's FFN input on the first T held-out tokens per language "
        "and write similarity.json. Run under deepspeed/torchrun to split the tokens "
        "across ranks.",
    )
    add_settings(p, ProfileSettings)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from layermoe_ds.analysis.profiling import run_profile

    settings = settings_of(args, ProfileSettings)
    report = run_profile(settings)
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher every rank holds the same report
        print(" ".join(f"{score:.3f}" for score in report["layer_score"]))
        print(f"layer scores ({report['score_rule']}) written to {settings.out}")
    return 0


def add_allocate(sub) -> None:
    p = sub.add_parser(
        "allocate",
        help="experts per layer from similarity (Eq. 10) and classifier layers",
        description="N_i = ceil((1/T_i) / sum_j (1/T_j) * budget), N_i counting the original FFN "
        "(N_i = 1 keeps a layer dense). The ceiling is the paper's rule and can overshoot the budget (e.g. 77 for 60 "
        "on 30 layers); --rounding exact hits it. Both totals are printed.",
    )
    p.add_argument("--similarity", type=Path, required=True, help="similarity.json from `layermoe profile`")
    p.add_argument("--budget", type=count(), default=None, help="total experts over all layers incl. expert 0")
    p.add_argument("--out", type=Path, default=None, help="allocation.json to write")
    p.add_argument(
        "--method",
        choices=("layermoe", "uniform", "random", "least-similar", "most-similar"),
        default="layermoe",
        help="least-similar / most-similar: the new experts spread evenly over the --focus-layers least (most) "
        "similar layers, the others dense (the premise test of layer-wise allocation)",
    )
    p.add_argument(
        "--rounding",
        choices=("ceil", "exact"),
        default="ceil",
        help="ceil: every layer's share rounded up (Eq. 10 as published; the total can exceed --budget); exact: "
        "largest remainder, the total equals --budget (within --min/--max-experts and --align)",
    )
    p.add_argument("--focus-layers", type=count(), default=None, help="for least-similar / most-similar")
    p.add_argument(
        "--classifier-layers",
        default=None,
        help="K (top-K by similarity), last-K, or a list 5,6,10; 0 = none (default: 7, the paper's K, "
        "capped at the number of layers)",
    )
    p.add_argument("--min-experts", type=count(), default=1)
    p.add_argument("--max-experts", type=count(), default=None)
    p.add_argument("--align", type=count(), default=1, help="round new experts per layer up to a multiple of this")
    p.add_argument("--seed", type=count(0), default=0, help="for --method random")
    p.add_argument(
        "--min-score",
        type=positive,
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
        describe,
        parse_budgets,
        sweep_file,
        write_allocation,
    )

    common = dict(
        method=args.method,
        classifier_layers=args.classifier_layers,
        min_experts=args.min_experts,
        max_experts=args.max_experts,
        align=args.align,
        seed=args.seed,
        min_score=args.min_score,
        rounding=args.rounding,
        focus_layers=args.focus_layers,
    )
    if args.sweep:
        budgets = parse_budgets(args.sweep, "--sweep")
        print(sweep_file(args.similarity, budgets, AllocationOptions(budget=budgets[0], **common)))
        if args.budget is None:
            return 0
    if args.budget is None or args.out is None:
        raise InputError("allocate: --budget and --out are required (unless only --sweep is given)")
    result = write_allocation(args.similarity, AllocationOptions(budget=args.budget, **common), args.out, args.plot)
    print(describe(result))
    if args.method == "layermoe":
        other = "exact" if args.rounding == "ceil" else "ceil"
        alternative = allocate_from_file(args.similarity, AllocationOptions(budget=args.budget, **{**common,
                                         "rounding": other}))  # fmt: skip
        print(f"(--rounding {other} would give Σ N_i = {alternative['total_experts']}, "
              f"{alternative['new_experts']} new)")  # fmt: skip
    return 0
