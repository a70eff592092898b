"""What a distributed launcher starts on every rank, as modules of the package, so an installed wheel needs no
checkout: `deepspeed --module layermoe_ds.launchers.stage1 …`, `torchrun -m layermoe_ds.launchers.stage2 …`. The
repository's `launchers/*.py` are the same entry points as files (`deepspeed launchers/stage1.py …`)."""


def stage_main(stage: int):
    """The `main(argv)` of stage `stage`'s entry point (`training/launch.py` holds its options)."""

    def main(argv: list[str] | None = None) -> int:
        from layermoe_ds.training.launch import main as launch

        return launch(stage, argv)

    return main
