"""Stage 2 of LayerMoE training on DeepSpeed: routers and language classifiers review old and new languages.

    deepspeed --num_gpus 8 --module layermoe_ds.launchers.stage2 --config run.yaml --deepspeed_config stage2.json

Options: `python -m layermoe_ds.launchers.stage2 --help` (layermoe_ds/training/launch.py).
"""

import sys

from layermoe_ds.launchers import stage_main

main = stage_main(2)

if __name__ == "__main__":
    sys.exit(main())
