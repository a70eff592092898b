"""Stage 1 of LayerMoE training on DeepSpeed: the new experts and routers learn the new languages.

    deepspeed --num_gpus 8 --module layermoe_ds.launchers.stage1 --config run.yaml --deepspeed_config stage1_zero2.json

Options: `python -m layermoe_ds.launchers.stage1 --help` (layermoe_ds/training/launch.py).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from layermoe_ds.training.launch import main as launch

    return launch(1, argv)


if __name__ == "__main__":
    sys.exit(main())
