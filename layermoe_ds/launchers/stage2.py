"""Stage 2 of LayerMoE training on DeepSpeed: routers and language classifiers review old and new languages.

    deepspeed --num_gpus 8 --module layermoe_ds.launchers.stage2 --config run.yaml --deepspeed_config stage2.json

Options: `python -m layermoe_ds.launchers.stage2 --help` (layermoe_ds/training/launch.py).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from layermoe_ds.training.launch import main as launch

    return launch(2, argv)


if __name__ == "__main__":
    sys.exit(main())
