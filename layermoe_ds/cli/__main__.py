"""`python -m layermoe_ds.cli`: the `layermoe` command."""

import sys

from layermoe_ds.cli import main

sys.exit(main())
