"""The checkout's entry point `deepspeed … launchers/stage2.py …`: runs layermoe_ds/launchers/stage2.py, which
an installed package runs as `deepspeed --module layermoe_ds.launchers.stage2 …`."""

import sys

from layermoe_ds.launchers.stage2 import main

if __name__ == "__main__":
    sys.exit(main())
