"""Dense → LayerMoE (`layermoe upcycle`) and lifelong growth of a LayerMoE model (`layermoe grow`).

Upcycling: layer i gets N_i experts; expert 0 is the original FFN, new experts are copies of it (random init is
much worse, MoE-LPR's ablation); routers and classifiers are xavier-normal, seeded by (seed, layer) so every rank
and every rerun builds the same model. Growing: existing experts keep their slots and weights and become "old";
new experts are again copies of the original FFN; router rows of old experts are kept (`keep`), or the routers of
the layers that gain experts are re-initialised whole (`reinit`, the reference behaviour: a layer that gains none
keeps its router); classifiers gain one class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from layermoe_ds.config import StrEnum, choice
from layermoe_ds.errors import InputError
from layermoe_ds.hf.files import (
    PlannedTensor,
    TensorSource,
    model_source,
    saved_keys,
    write_model_dir,
    write_safetensors,
)
from layermoe_ds.hf.load import check_tensors
from layermoe_ds.modeling.families import (
    Layout,
    causal_lm_class,
    dense_tensor_names,
    embedding_name,
    expandable,
    expert_prefix,
)
from layermoe_ds.modeling.types import (
    expanded_classes,
    is_layermoe,
    layermoe_classes,
    layermoe_model_type,
    model_config,
)

log = logging.getLogger(__name__)

_DENSE_CONFIG_DROP = ("model_type", "architectures", "auto_map", "transformers_version")


def _classes_for(dense_config):
    """(LayerMoE config class, model class, layout) of a dense model that can be expanded."""
    try:
        _, layout = expandable(dense_config)
    except ValueError as exc:
        raise InputError(f"upcycle: {exc}") from None
    return (*expanded_classes(dense_config), layout)


def dense_source(model_dir: Path, dense_config) -> TensorSource:
    """A dense directory's tensors under the names of the modules they load into."""
    source = TensorSource(model_dir)
    return source.renamed(dense_tensor_names(causal_lm_class(dense_config), dense_config, source.names()))


def seeded_xavier(shape: Sequence[int], seed: int, layer: int, salt: int) -> torch.Tensor:
    """Xavier-normal fp32 weights seeded by (seed, layer, salt): the same on every rank and every rerun."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + salt)
    fan_out, fan_in = shape
    std = (2.0 / (fan_in + fan_out)) ** 0.5
    return torch.randn(tuple(shape), generator=generator) * std


def _seeded_xavier(weight: torch.Tensor, seed: int, layer: int, salt: int) -> None:
    with torch.no_grad():
        weight.copy_(seeded_xavier(weight.shape, seed, layer, salt))


def _check_allocation(allocation: dict, num_layers: int) -> tuple[list[int], list[int]]:
    counts = allocation.get("experts_per_layer")
    if not isinstance(counts, list) or not all(isinstance(n, int) and n >= 1 for n in counts):
        raise InputError(f"allocation: experts_per_layer must be a list of integers >= 1, got {counts!r}")
    if len(counts) != num_layers:
        raise InputError(
            f"allocation: experts_per_layer has {len(counts)} entries but the model has {num_layers} "
            "layers (was it made for another model?)"
        )
    cls_layers = allocation.get("classifier_layers", [])
    bad = [i for i in cls_layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise InputError(f"allocation: classifier_layers {bad} are outside 0..{num_layers - 1}")
    return counts, list(cls_layers)


def _allocation_record(allocation: dict) -> dict:
    keep = ("method", "budget", "experts_per_layer", "classifier_layers", "new_experts", "source", "seed")
    return {k: allocation[k] for k in keep if k in allocation}


def _usable_classifier_layers(requested: Sequence[int], counts: Sequence[int]) -> list[int]:
    dense = sorted(i for i in requested if counts[i] == 1)
    if dense:
        log.warning("classifier layers %s are dense (N_i = 1): no router to steer there, no classifier placed", dense)
    return sorted(i for i in requested if counts[i] > 1)


def upcycled_config(dense_config, allocation: dict, top_k: int = 2, classifier_mode: str = "per-token"):
    """(LayerMoE config, model class) for a dense HF config and an allocation."""
    config_cls, model_cls, layout = _classes_for(dense_config)
    dense_dict = {k: v for k, v in dense_config.to_dict().items() if k not in _DENSE_CONFIG_DROP}
    counts, requested = _check_allocation(allocation, dense_config.get_text_config().num_hidden_layers)
    config = config_cls(
        **dense_dict,
        experts_per_layer=counts,
        expert_groups=[[0] + [1] * (n - 1) for n in counts],
        num_groups=2,
        classifier_layers=_usable_classifier_layers(requested, counts),
        classifier_mode=classifier_mode,
        classifier_routing=False,  # the classifiers are trained in stage 2, which switches this on
        moe_top_k=top_k,
        allocation={"history": [_allocation_record(allocation)]},
        decoder_layers=layout.decoder_layers,
        ffn_module=layout.ffn_module,
    )
    return config, model_cls


def upcycle(
    dense: nn.Module, allocation: dict, top_k: int = 2, classifier_mode: str = "per-token", seed: int = 0
) -> nn.Module:
    """A LayerMoE model from a dense HF causal LM and an allocation (see `layermoe allocate`), in memory: the
    reference for `upcycle_dir`, which streams the same tensors."""
    config, model_cls = upcycled_config(dense.config, allocation, top_k, classifier_mode)
    counts, layout = config.experts_per_layer, Layout.of(config)
    model = model_cls(config).to(next(dense.parameters()).dtype)
    state = {}
    for key, value in dense.state_dict().items():
        where = layout.split(key)
        if where is None or counts[where[0]] == 1:
            state[key] = value
            continue
        layer, rest = where
        state[f"{layout.expert(layer, 0)}.{rest}"] = value
        for k in range(1, counts[layer]):
            state[f"{layout.expert(layer, k)}.{rest}"] = value.clone()
    for layer, block in model.moe_blocks().items():
        _seeded_xavier(block.router.weight, seed, layer, salt=1)
        state[f"{layout.ffn(layer)}.router.weight"] = block.router.weight.detach().clone()
        if block.classifier is not None:
            _seeded_xavier(block.classifier.weight, seed, layer, salt=2)
            state[f"{layout.ffn(layer)}.classifier.weight"] = block.classifier.weight.detach().clone()
    _load_exact(model, state)
    return model


def upcycle_source_name(name: str, counts: Sequence[int], layout: Layout) -> str | tuple[str, int]:
    """Where an upcycled model's tensor comes from: the dense tensor's name, or ("router"|"classifier", layer)."""
    where = layout.split(name)
    if where is None or counts[where[0]] == 1:
        return name
    layer, rest = where
    if rest == "router.weight":
        return ("router", layer)
    if rest == "classifier.weight":
        return ("classifier", layer)
    if rest.startswith("experts."):  # expert 0 and every new expert start as the FFN
        return f"{layout.ffn(layer)}.{rest.split('.', 2)[2]}"
    raise InputError(f"upcycle: no source for {name}")


def upcycle_dir(
    model_dir: Path,
    allocation: dict,
    out: Path,
    top_k: int = 2,
    classifier_mode: str = "per-token",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
):
    """`layermoe upcycle`: read the dense directory tensor by tensor and write the LayerMoE directory shard by
    shard, in the input's dtype unless `dtype` says otherwise; no model is materialised. The same tensors as
    `upcycle` (tested). Returns the LayerMoE config."""
    model_dir = Path(model_dir)
    dense_config = model_config(model_dir)
    if is_layermoe(dense_config):
        raise InputError(f"upcycle: {model_dir} is already a LayerMoE model; use `layermoe grow` to add languages")
    config, model_cls = upcycled_config(dense_config, allocation, top_k, classifier_mode)
    source = dense_source(model_dir, dense_config)
    with torch.device("meta"):
        skeleton = model_cls(config)
    dtype = dtype or source.dtype(embedding_name(skeleton))
    config.dtype = dtype
    counts, layout = config.experts_per_layer, Layout.of(config)
    plan, used = [], set()
    for name, (shape, _) in saved_keys(skeleton).items():
        origin = upcycle_source_name(name, counts, layout)
        if isinstance(origin, tuple):
            kind, layer = origin
            salt = 1 if kind == "router" else 2
            make = lambda shape=shape, layer=layer, salt=salt: seeded_xavier(shape, seed, layer, salt)  # noqa: E731
        else:
            if origin not in source:
                raise InputError(f"upcycle: {model_dir} has no tensor {origin!r} (needed for {name})")
            if source.shape(origin) != shape:
                raise InputError(
                    f"upcycle: {model_dir}: {origin} has shape {source.shape(origin)}, config.json implies {shape}"
                )
            used.add(origin)
            make = lambda origin=origin: source.get(origin)  # noqa: E731
        plan.append(PlannedTensor(name, shape, dtype, make))
    unused = sorted(set(source.names()) - used - {"lm_head.weight"})
    if unused:
        raise InputError(f"upcycle: {model_dir} holds tensors the model does not use: {unused[:3]}")
    write_model_dir(
        out, config, model_cls, lambda d: write_safetensors(d, plan, max_shard_bytes), tokenizer_from=model_dir
    )
    return config


class RouterInit(StrEnum):
    KEEP = "keep"  # the old experts' router rows stay; the new experts' rows start at zero
    REINIT = "reinit"  # the routers of the layers that gain experts start afresh (the reference)


class ClassifierPolicy(StrEnum):
    UNION = "union"  # the earlier classifier layers plus the new allocation's
    NEW = "new"  # the new allocation's alone (the reference)


def grown_config(old, allocation: dict, router: str = RouterInit.KEEP, classifiers: str = ClassifierPolicy.UNION):
    """(config, model class) of a LayerMoE config grown by one language group as `allocation` says. Classifier
    layers: `union` keeps the earlier ones and adds the new allocation's; `new` (the reference's) takes the new
    allocation's alone, dropping the classifiers of the layers it does not name."""
    router = choice(RouterInit, router, "grow --router")
    classifiers = choice(ClassifierPolicy, classifiers, "grow --classifiers")
    added, requested = _check_allocation(allocation, old.get_text_config().num_hidden_layers)
    new_group = old.num_groups
    counts = [n + a - 1 for n, a in zip(old.experts_per_layer, added, strict=True)]
    groups = [g + [new_group] * (a - 1) for g, a in zip(old.expert_groups, added, strict=True)]
    classifier_layers = set(_usable_classifier_layers(requested, counts))
    if classifiers == ClassifierPolicy.UNION:
        classifier_layers |= set(old.classifier_layers)
    classifier_layers = sorted(classifier_layers)
    config_cls, model_cls = layermoe_classes(old.model_type)
    config_dict = {k: v for k, v in old.to_dict().items() if k not in _DENSE_CONFIG_DROP}
    config_dict.update(
        experts_per_layer=counts,
        expert_groups=groups,
        num_groups=new_group + 1,
        classifier_layers=classifier_layers,
        classifier_routing=False,
        allocation={"history": [*(old.allocation or {}).get("history", []), _allocation_record(allocation)]},
    )
    return config_cls(**config_dict), model_cls


def grown_tensor(name: str, shape, old, counts: Sequence[int], source, router: str, seed: int) -> torch.Tensor:
    """One tensor of the grown model, from the old model's tensors (`source.get(name)`): the rules of `grow`."""
    where = Layout.of(old).split(name)
    if where is None or counts[where[0]] == 1:
        return source.get(name)
    layer, rest = where
    prefix, n_old, new_group = Layout.of(old).ffn(layer), old.experts_per_layer[layer], old.num_groups
    ffn = prefix if n_old == 1 else expert_prefix(prefix, 0)  # the original FFN in the old model
    if rest.startswith("experts."):
        _, k, tail = rest.split(".", 2)
        return source.get(name) if 0 < int(k) < n_old else source.get(f"{ffn}.{tail}")
    if rest == "router.weight":
        weight = seeded_xavier(shape, seed, layer, 10 + new_group)
        if n_old > 1 and (router == RouterInit.KEEP or counts[layer] == n_old):  # `reinit`: layers that gained experts
            weight[:n_old] = source.get(name)
        return weight
    if rest == "classifier.weight":
        weight = seeded_xavier(shape, seed, layer, 20 + new_group)
        if n_old > 1 and layer in old.classifier_layers:
            weight[:new_group] = source.get(name)
        return weight
    raise InputError(f"grow: no source for {name}")


def grow_dir(
    model_dir: Path,
    allocation: dict,
    out: Path,
    router: str = RouterInit.KEEP,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    classifiers: str = ClassifierPolicy.UNION,
):
    """`layermoe grow`, streamed like `upcycle_dir`: the same tensors as `grow` (tested). Returns the config."""
    model_dir = Path(model_dir)
    model_type = layermoe_model_type(model_dir)
    if model_type is None:
        raise InputError(f"grow: {model_dir} is not a LayerMoE model; use `layermoe upcycle` first")
    old = layermoe_classes(model_type)[0].from_pretrained(model_dir)
    config, model_cls = grown_config(old, allocation, router, classifiers)
    source = model_source(model_dir)
    with torch.device("meta"):
        skeleton = model_cls(config)
    dtype = dtype or source.dtype(embedding_name(skeleton))
    config.dtype = dtype
    plan = [
        PlannedTensor(
            name,
            shape,
            dtype,
            lambda name=name, shape=shape: grown_tensor(
                name, shape, old, config.experts_per_layer, source, router, seed
            ),
        )  # fmt: skip
        for name, (shape, _) in saved_keys(skeleton).items()
    ]
    write_model_dir(
        out, config, model_cls, lambda d: write_safetensors(d, plan, max_shard_bytes), tokenizer_from=model_dir
    )
    return config


def grow(
    model: nn.Module,
    allocation: dict,
    router: str = RouterInit.KEEP,
    seed: int = 0,
    classifiers: str = ClassifierPolicy.UNION,
) -> nn.Module:
    """Lifelong step: add N_i − 1 experts per layer for a new language group (N_i from the new allocation, counted
    like any allocation: the original FFN plus the experts to add)."""
    if not is_layermoe(model):
        raise InputError(f"grow: {type(model).__name__} is not a LayerMoE model; use `layermoe upcycle` first")
    old = model.config
    config, model_cls = grown_config(old, allocation, router, classifiers)
    counts, new_group, layout = config.experts_per_layer, old.num_groups, Layout.of(old)
    grown = model_cls(config).to(next(model.parameters()).dtype)
    old_state = model.state_dict()
    state = {}
    for key, value in old_state.items():
        where = layout.split(key)
        if where is None or counts[where[0]] == 1:  # everything outside the grown model's MoE blocks stays as it is
            state[key] = value
    for layer in range(len(counts)):
        prefix = layout.ffn(layer)
        n_old, n_new = old.experts_per_layer[layer], counts[layer]
        if n_new == 1:
            continue
        base = {k[len(prefix) + 1 :]: v for k, v in old_state.items() if k.startswith(prefix + ".")}
        if n_old == 1:  # a dense layer becomes MoE: its FFN is expert 0
            base = {f"experts.0.{k}": v for k, v in base.items()}
        ffn = {k[len("experts.0.") :]: v for k, v in base.items() if k.startswith("experts.0.")}
        for key, value in base.items():
            if key.startswith("experts."):
                state[f"{prefix}.{key}"] = value
        for k in range(n_old, n_new):
            for rest, value in ffn.items():
                state[f"{expert_prefix(prefix, k)}.{rest}"] = value.clone()
        block = grown.moe_blocks()[layer]
        _seeded_xavier(block.router.weight, seed, layer, salt=10 + new_group)
        router_weight = block.router.weight.detach().clone()
        if n_old > 1 and (router == RouterInit.KEEP or n_new == n_old):  # `reinit`: only layers that gained experts
            router_weight[:n_old] = base["router.weight"]
        state[f"{prefix}.router.weight"] = router_weight
        if block.classifier is not None:
            _seeded_xavier(block.classifier.weight, seed, layer, salt=20 + new_group)
            classifier = block.classifier.weight.detach().clone()
            if "classifier.weight" in base:
                classifier[:new_group] = base["classifier.weight"]
            state[f"{prefix}.classifier.weight"] = classifier
    _load_exact(grown, state)
    return grown


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict) with a message that names the first missing/unexpected key or shape mismatch."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(expected, {name: tuple(t.shape) for name, t in state.items()}, "weights")
    model.load_state_dict(state, strict=True)
