"""layermoe_ds: multilingual expansion of a dense LLM with layer-wise mixtures of experts (LayerMoE) on DeepSpeed.

Packages (docs/development.md#code-layout): `data` (tokenizing, token shards, stage data) → `modeling` (the LayerMoE
block, upcycling, Hugging Face I/O) → `ds` (the DeepSpeed boundary: its MoE layer, engine, names, process group) →
`checkpoints` (format, reading, saving and resuming) → `training` (both stages) and `analysis` (profiling,
allocation) → `eval` → `cli`. The testbed (the corpus, tiny bases, the real base, experiments) is its own top-level
package beside this one, `layermoe_testbed`, which the product never imports (only the CLI's testbed verbs do).

Shape letters, one meaning each in every module: B batch rows, L sequence length (positions), T tokens (B·L
flattened, or a list of slots), H hidden size, F FFN width, V vocabulary, C tokens of one loss chunk, E experts of
a layer (expert 0 first), K routes per token (top-k), R routes (T·K), G language groups, A languages, N layers.
S and M are DeepSpeed's names for tokens and hidden size in its dispatch interface (`ds/moe_layer.py`).
"""
