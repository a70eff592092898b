"""The checkout's entry point `deepspeed … launchers/stage1.py …`: runs layermoe_ds/launchers/stage1.py, which
an installed package runs as `deepspeed --module layermoe_ds.launchers.stage1 …`."""

import sys

from layermoe_ds.launchers.stage1 import main

if __name__ == "__main__":
    sys.exit(main())
