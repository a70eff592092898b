"""`make bench-gpu`'s first step: refuse in one line where no CUDA GPU is visible (before any benchmark starts)."""

import sys

import torch

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print(
            "make bench-gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
            "`make bench` runs the CPU benchmarks",
            file=sys.stderr,
        )
        sys.exit(2)
    print(f"make bench-gpu: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}")
