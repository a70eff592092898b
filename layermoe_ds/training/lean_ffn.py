"""Gated feed-forwards that keep two activations for backward instead of three (as Liger's SiLU-mul does).

`down(act(gate(x)) * up(x))` under autograd keeps gate(x), act(gate(x)) and up(x) for the backward pass: in an
upcycled model every expert does, each over its capacity's worth of token slots, and at Qwen2-0.5B's FFN width
(4,864) that is most of a training step's activation memory. `act_mul` keeps gate(x) and up(x) and recomputes the
activation in backward (one elementwise op); its gradients are computed by the same kernels autograd uses, so
training is unchanged to the bit. It covers SwiGLU (Llama, Qwen, Mistral…), GeGLU with tanh or exact GELU (Gemma)
and FFNs with one fused `gate_up_proj` (Phi-3): where a family keeps the projections is its `families.FAMILIES`
entry. Which activation a module uses is checked by value, not by name.

Shape letters (`layermoe_ds/__init__.py`): T tokens (or expert slots), F the FFN width.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from layermoe_ds.modeling.families import GatedFFN, family_of

aten = torch.ops.aten

# name → (forward, backward(grad_of_output, input))
ACTIVATIONS = {
    "silu": (F.silu, aten.silu_backward),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda g, x: aten.gelu_backward(g, x, approximate="tanh")),
    "gelu": (F.gelu, lambda g, x: aten.gelu_backward(g, x, approximate="none")),
}


class _ActMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_TF, up_TF, activation: str):
        ctx.save_for_backward(gate_TF, up_TF)
        ctx.activation = activation
        return ACTIVATIONS[activation][0](gate_TF) * up_TF

    @staticmethod
    def backward(ctx, grad_TF):
        gate_TF, up_TF = ctx.saved_tensors
        forward, backward = ACTIVATIONS[ctx.activation]
        grad_gate = backward(grad_TF * up_TF, gate_TF) if ctx.needs_input_grad[0] else None
        grad_up = grad_TF * forward(gate_TF) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def act_mul(gate_TF: torch.Tensor, up_TF: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) · up, keeping only its two inputs for backward."""
    return _ActMul.apply(gate_TF, up_TF, activation)


def silu_mul(gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
    return act_mul(gate_TF, up_TF, "silu")


def activation_of(fn) -> str | None:
    """Which of ACTIVATIONS the module or function `fn` computes, bit for bit on a probe; None if none."""
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        got = fn(probe)
        return next((name for name, (forward, _) in ACTIVATIONS.items() if torch.equal(got, forward(probe))), None)


def _gated_forward(module, ffn: GatedFFN):
    """The lean forward for a gated FFN module with the family's parts, or None when it is not one."""
    if not ffn.matches(module):
        return None
    activation = activation_of(getattr(module, ffn.activation))
    if activation is None:
        return None
    gate, up, down = ffn.gate, ffn.up, ffn.down

    if up is None:  # one fused projection: [gate, up]

        def fused(self, x):
            gate_TF, up_TF = getattr(self, gate)(x).chunk(2, dim=-1)
            return getattr(self, down)(act_mul(gate_TF, up_TF, activation))

        return fused

    def separate(self, x):
        return getattr(self, down)(act_mul(getattr(self, gate)(x), getattr(self, up)(x), activation))

    return separate


def use_lean_ffn(model) -> int:
    """Every gated feed-forward of `model` (dense FFNs, expert 0, DeepSpeed's experts) computes through `act_mul`;
    the forward is replaced on each instance, so names and weights are untouched. Returns how many (0 for a family
    whose FFN is not gated)."""
    ffn = family_of(getattr(model.config, "model_type", "")).ffn
    if ffn is None:
        return 0
    count = 0
    for module in model.modules():
        forward = _gated_forward(module, ffn)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
