"""Stage 2 of LayerMoE training on DeepSpeed: routers and classifiers review old and new languages.

Options: layermoe_ds/training/launch.py (`python launchers/stage2.py --help`).
"""

import sys

from layermoe_ds.training.launch import main

if __name__ == "__main__":
    sys.exit(main(2))
