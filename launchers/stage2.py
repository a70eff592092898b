"""Stage 2 (review: routers + classifiers on mixed text) of LayerMoE training on DeepSpeed (see layermoe_ds/training/launch.py for the options)."""

import sys

from layermoe_ds.training.launch import main

if __name__ == "__main__":
    sys.exit(main(2))
