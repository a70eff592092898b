"""SwiGLU feed-forwards that keep two activations for backward instead of three (as Liger's SiLU-mul does).

`down(silu(gate(x)) * up(x))` under autograd keeps gate(x), silu(gate(x)) and up(x) for the backward pass: in an
upcycled model every expert does, each over its capacity's worth of token slots, and at Qwen2-0.5B's FFN width
(4,864) that is most of a training step's activation memory. `silu_mul` keeps gate(x) and up(x) and recomputes
the SiLU in backward (one elementwise op); its gradients are computed by the same kernels autograd uses, so
training is unchanged to the bit.

Shape letters (`layermoe_ds/__init__.py`): T tokens (or expert slots), F the FFN width.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_TF, up_TF):
        ctx.save_for_backward(gate_TF, up_TF)
        return F.silu(gate_TF) * up_TF

    @staticmethod
    def backward(ctx, grad_TF):
        gate_TF, up_TF = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad_TF * up_TF, gate_TF) if ctx.needs_input_grad[0] else None
        grad_up = grad_TF * F.silu(gate_TF) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, keeping only its two inputs for backward."""
    return _SiluMul.apply(gate_TF, up_TF)


def _is_swiglu(module) -> bool:
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if not all(hasattr(module, name) for name in parts):
        return False
    act = module.act_fn
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_swiglu(model) -> int:
    """Every SwiGLU feed-forward of `model` (dense FFNs, expert 0, DeepSpeed's experts) computes through
    `silu_mul`; the forward is replaced on each instance, so names and weights are untouched. Returns how many."""

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    found = [m for m in model.modules() if _is_swiglu(m)]
    for module in found:
        module.forward = types.MethodType(forward, module)
    return len(found)
