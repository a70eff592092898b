"""The checkout's entry point `deepspeed … launchers/profile_similarity.py …`: runs the package's module
layermoe_ds/launchers/profile_similarity.py (`deepspeed --module layermoe_ds.launchers.profile_similarity …`)."""

import sys

from layermoe_ds.launchers.profile_similarity import main

if __name__ == "__main__":
    sys.exit(main())
