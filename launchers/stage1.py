"""Stage 1 of LayerMoE training on DeepSpeed: the new experts and routers learn the new languages.

Options: layermoe_ds/training/launch.py (`python launchers/stage1.py --help`).
"""

import sys

from layermoe_ds.training.launch import main

if __name__ == "__main__":
    sys.exit(main(1))
