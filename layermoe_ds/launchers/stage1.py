"""Stage 1 of LayerMoE training on DeepSpeed: the new experts and routers learn the new languages.

    deepspeed --num_gpus 8 --module layermoe_ds.launchers.stage1 --config run.yaml --deepspeed_config stage1_zero2.json

Options: `python -m layermoe_ds.launchers.stage1 --help` (layermoe_ds/training/launch.py).
"""

import sys

from layermoe_ds.launchers import stage_main

main = stage_main(1)

if __name__ == "__main__":
    sys.exit(main())
