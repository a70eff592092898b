"""Build a model with its parameters on the meta device, then give each parameter its real tensor, read by name.

A training rank builds the whole LayerMoE model as shapes only, swaps in its expert-parallel layers (which keep only
this rank's experts), and only then materialises what is left, straight in the run's dtype: no fp32 copy of the
model, no expert another rank owns, no random initialisation that loading would overwrite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from layermoe_ds.errors import InputError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost); buffers
    stay real, since some (rotary frequencies) are computed in `__init__` and saved nowhere."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize(
    model: nn.Module,
    load: Callable[[str, nn.Parameter], torch.Tensor],
    dtype_of: Callable[[str, nn.Parameter], torch.dtype],
    device: torch.device | str = "cpu",
) -> list[str]:
    """Replace every meta parameter with `load(name, meta_param)` cast to `dtype_of(name, param)` on `device`;
    returns the names loaded. A parameter shared by several modules (tied embeddings) is loaded once, stays shared."""
    loaded, replaced = [], {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) in replaced:
                module._parameters[name] = replaced[id(param)]
                continue
            full = f"{module_name}.{name}" if module_name else name
            tensor = load(full, param)
            if tuple(tensor.shape) != tuple(param.shape):
                raise InputError(
                    f"model: {full} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            tensor = tensor.to(device=device, dtype=dtype_of(full, param))
            new = nn.Parameter(tensor, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)  # DeepSpeed tags expert parameters (allreduce, group_name)
            replaced[id(param)] = module._parameters[name] = new
            loaded.append(full)
    return loaded
