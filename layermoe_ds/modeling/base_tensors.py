"""A LayerMoE model's tensors read from the directory it starts from, by name: a LayerMoE directory, or the dense
model a stage-1 run (or a checkpoint of one) upcycles on the fly, whose tensors are read under the names of the
modules they load into."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from layermoe_ds.errors import InputError
from layermoe_ds.hf.files import model_source
from layermoe_ds.modeling.families import Layout, embedding_name
from layermoe_ds.modeling.types import model_config
from layermoe_ds.modeling.upcycle import dense_source, seeded_xavier, upcycle_source_name


def base_loader(model: nn.Module, base_dir: Path, from_dense: bool, seed: int | None):
    """name → tensor of a LayerMoE model (its names on disk) from its base directory: the same name in a LayerMoE
    base; in a dense base (read by module names, `dense_source`), what upcycling takes it from (expert 0 and the new
    experts are the FFN), with the seeded router/classifier initialisation (`seed` None: those must come from
    elsewhere, e.g. a checkpoint)."""
    source = dense_source(base_dir, model_config(base_dir)) if from_dense else model_source(base_dir)
    config = model.config
    counts = getattr(config, "experts_per_layer", None)
    layout = Layout.of(config) if from_dense else None
    embeddings, tied = embedding_name(model), getattr(config, "tie_word_embeddings", False)

    def load(name: str, param: nn.Parameter) -> torch.Tensor:
        if from_dense:
            origin = upcycle_source_name(name, counts, layout)
            if isinstance(origin, tuple):  # a new router or classifier: upcycle's seeded initialisation
                if seed is None:
                    raise InputError(f"{name}: not in the checkpoint, and the dense base has no such tensor")
                kind, layer = origin
                return seeded_xavier(param.shape, seed, layer, 1 if kind == "router" else 2)
            name = origin
        if name not in source and name == "lm_head.weight" and tied:
            name = embeddings
        return source.get(name)

    return load
