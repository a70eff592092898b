"""The testbed: what the project builds to test and demonstrate itself without a model hub, never what a user's run
imports (tests/test_layout.py holds every other package to that).

- `corpus`, `help_html`: the small multilingual corpus (`layermoe build-corpus`), from the help pages on the machine.
- `tokenizer_training`: a SentencePiece tokenizer over its languages (`layermoe train-tokenizer`).
- `pretrain`, `pretrain_config`: the tiny dense base models (`layermoe pretrain --preset demo|deep`).
- `demo`: `make demo` end to end; `experiment`: the presets, runner and report of `layermoe experiment`.
"""
