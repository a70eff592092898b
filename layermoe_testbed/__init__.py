"""The testbed: what the project builds to test and demonstrate itself without a model hub. A top-level package of
its own beside the product (`layermoe_ds`), in the same distribution; it imports the product, never the other way
round: only the CLI's testbed verbs import it, inside their bodies (tests/test_layout.py).

- `corpus`, `help_html`: the small multilingual corpus (`layermoe build-corpus`), from the help pages on the machine.
- `tokenizer_training`: a SentencePiece tokenizer over its languages (`layermoe train-tokenizer`).
- `pretrain`, `pretrain_config`: the tiny dense base models (`layermoe pretrain --preset demo|deep`).
- `real_base`: the real base (`layermoe real-base`); `calibration`: `layermoe calibrate`;
- `demo`: `make demo` end to end; `experiment`: the presets, runner and report of `layermoe experiment`.
"""
