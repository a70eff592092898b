"""Configuration of a LayerMoE model: the dense architecture's config plus the per-layer expert layout.

One class per dense config class, derived on first use (`layermoe_config_class`, or by name through the module's
`__getattr__`: `LayerMoEQwen3Config` from transformers' `Qwen3Config`): a family the installed transformers lacks
is simply never asked for, and breaks nothing else.
"""

from __future__ import annotations

import dataclasses
import re

import transformers
from transformers import PreTrainedConfig

CLASSIFIER_MODES = ("per-token", "prefix-mean")


def _validate_layermoe(config) -> None:
    layers = config.get_text_config().num_hidden_layers  # a multimodal wrapper's language model's
    counts = list(config.experts_per_layer or [1] * layers)
    if len(counts) != layers:
        raise ValueError(f"experts_per_layer: {len(counts)} entries for {layers} layers")
    if any(not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"experts_per_layer: {counts} must be integers >= 1")
    groups = config.expert_groups or [[0] + [1] * (n - 1) for n in counts]
    if [len(g) for g in groups] != counts:
        raise ValueError(f"expert_groups: sizes {[len(g) for g in groups]} do not match experts_per_layer {counts}")
    for i, g in enumerate(groups):
        if g[0] != 0 or g != sorted(g) or g[-1] >= config.num_groups:
            raise ValueError(
                f"expert_groups[{i}]: {g} must start with 0 (the original FFN), never decrease and stay "
                f"below num_groups {config.num_groups}"
            )
    bad = [i for i in config.classifier_layers or [] if not 0 <= i < layers or counts[i] == 1]
    if bad:
        raise ValueError(f"classifier_layers: {bad} are outside 0..{layers - 1} or dense layers")
    if config.classifier_mode not in CLASSIFIER_MODES:
        raise ValueError(f"classifier_mode: {config.classifier_mode!r} is not one of {CLASSIFIER_MODES}")
    if config.moe_top_k < 1:
        raise ValueError(f"moe_top_k: {config.moe_top_k} must be >= 1")
    config.experts_per_layer, config.expert_groups = counts, [list(g) for g in groups]
    config.classifier_layers = sorted(config.classifier_layers or [])


# name → (type, default, meaning): the LayerMoE fields, mixed in before each dense architecture's config.
FIELDS = {
    "experts_per_layer": (list | None, None, "N_i, total experts of layer i including the original FFN (expert 0)"),
    "expert_groups": (list | None, None, "per layer: the language group that added each expert (expert 0: group 0)"),
    "num_groups": (int, 2, "language groups known so far: old + one per expansion"),
    "classifier_layers": (list | None, None, "layers with an old/new-language classifier before the router"),
    "classifier_mode": (str, "per-token", "what the classifier reads: each token, or the mean of its prefix"),
    "classifier_routing": (bool, True, 'class "old" → expert 0 alone (stage 2 and inference); off in stage 1'),
    "moe_top_k": (int, 2, "experts a token is routed to"),
    "allocation": (dict | None, None, "the allocation.json history this model was upcycled and grown from"),
    "dense_model_type": (str | None, None, "the architecture this model expands (set from the class)"),
    "decoder_layers": (str, "model.layers", "attribute path from the causal LM to its list of decoder layers"),
    "ffn_module": (str, "mlp", "the decoder layer's attribute that holds its feed-forward module"),
}
# transformers 5.4 made configs dataclasses (fields declared, checked by huggingface_hub's `strict`); 5.0–5.3 set
# them in `__init__`. An export loads under either.
DATACLASS_CONFIGS = dataclasses.is_dataclass(PreTrainedConfig)


class _LayerMoEChecks:
    def _check_layermoe(self) -> None:
        self.dense_model_type = self.dense_model_type or type(self).dense_model_type_of()
        _validate_layermoe(self)

    @classmethod
    def dense_model_type_of(cls) -> str:
        dense = next(base for base in cls.__mro__[1:] if "model_type" in vars(base) and base is not LayerMoEFields)
        return dense.model_type


if DATACLASS_CONFIGS:
    from huggingface_hub.dataclasses import strict

    def _post_init(self, **kwargs):
        super(LayerMoEFields, self).__post_init__(**kwargs)
        self._check_layermoe()

    _namespace = {name: default for name, (_, default, _) in FIELDS.items()}
    _namespace |= {"__annotations__": {name: kind for name, (kind, _, _) in FIELDS.items()}, "__module__": __name__}
    LayerMoEFields = strict(type("LayerMoEFields", (_LayerMoEChecks, PreTrainedConfig), _namespace))
    LayerMoEFields.__post_init__ = _post_init
else:

    class LayerMoEFields(_LayerMoEChecks, PreTrainedConfig):
        def __init__(self, **kwargs):
            for name, (_, default, _) in FIELDS.items():
                setattr(self, name, kwargs.pop(name, default))
            super().__init__(**kwargs)
            self._check_layermoe()


_CLASSES: dict[str, type] = {}


def layermoe_config_class(dense_config_cls: type) -> type:
    """`LayerMoE<Dense>Config` (model_type `layermoe_<dense model_type>`): the dense config's fields and code plus
    LayerMoE's."""
    name = f"LayerMoE{dense_config_cls.__name__}"
    if name not in _CLASSES:
        namespace = {"model_type": f"layermoe_{dense_config_cls.model_type}", "__module__": __name__}
        cls = type(name, (LayerMoEFields, dense_config_cls), {**namespace, "__qualname__": name})
        _CLASSES[name] = strict(cls) if DATACLASS_CONFIGS else cls
    return _CLASSES[name]


def __getattr__(name: str):
    """`LayerMoE<X>Config` for any `<X>Config` of the installed transformers (how an export's `auto_map` finds its
    class in this file)."""
    match = re.fullmatch(r"LayerMoE(\w+Config)", name)
    dense = getattr(transformers, match[1], None) if match else None
    if not (isinstance(dense, type) and issubclass(dense, PreTrainedConfig) and getattr(dense, "model_type", "")):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return layermoe_config_class(dense)
