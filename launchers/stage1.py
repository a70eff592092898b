"""Stage 1 (learn the new languages: new experts + routers) of LayerMoE training on DeepSpeed (see layermoe_ds/training/launch.py for the options)."""

import sys

from layermoe_ds.training.launch import main

if __name__ == "__main__":
    sys.exit(main(1))
