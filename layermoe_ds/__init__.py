"""layermoe_ds: multilingual expansion of a dense LLM with layer-wise mixtures of experts (LayerMoE) on DeepSpeed.

Packages: `data` (corpus, tokenizer, token shards) → `modeling` (upcycle, the LayerMoE block, HF export) →
`training` (both stages on DeepSpeed) and `analysis` (profiling, allocation) → `eval` → `experiment` → `cli`.

Shape letters, one meaning each in every module: B batch rows, L sequence length (positions), T tokens (B·L
flattened, or a list of slots), H hidden size, F FFN width, V vocabulary, C tokens of one loss chunk, E experts of
a layer (expert 0 first), K routes per token (top-k), R routes (T·K), G language groups, A languages, N layers.
S and M are DeepSpeed's names for tokens and hidden size in its dispatch interface (`modeling/moe_layer.py`).
"""
