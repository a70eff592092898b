"""Profile under a distributed launcher: `deepspeed --num_gpus N --module layermoe_ds.launchers.profile_similarity
--model … --out …` (or launchers/profile_similarity.py in a checkout).

Same options as `layermoe profile`; ranks split the tokens and all-reduce the sums. (Not named profile.py: the
script's directory comes first on sys.path and would shadow the standard library's `profile`, which torch imports.)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from layermoe_ds.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    args = [a for a in args if not a.startswith("--local_rank")]
    return cli_main(["profile", *args])


if __name__ == "__main__":
    sys.exit(main())
