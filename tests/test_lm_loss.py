"""The fused, chunked next-token loss equals Hugging Face's, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch

from layermoe_ds.modeling.lm_loss import (
    IGNORE_INDEX,
    chunk_tokens_for,
    linear_cross_entropy,
    shifted_targets,
    use_chunked_loss,
)


def _grads(model, ids, chunk=None):
    model.zero_grad(set_to_none=True)
    if chunk is not None:
        use_chunked_loss(model, chunk)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 10_000])
def test_fused_loss_matches_hugging_face_on_every_gradient(tiny_base, chunk):
    from layermoe_ds.hf.load import load_causal_lm

    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    reference = load_causal_lm(tiny_base, torch.float32, "cpu")
    ref_loss, ref_grads = _grads(reference, ids)
    model = load_causal_lm(tiny_base, torch.float32, "cpu")
    loss, grads = _grads(model, ids, chunk)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert "lm_head.weight" in grads or "model.embed_tokens.weight" in grads  # the output weight trains here
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ignored_targets_and_frozen_head():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen: no gradient computed for it
    targets = torch.randint(0, 50, (11,))
    targets[[2, 5, 10]] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(reference_hidden @ weight.T, targets)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    assert torch.equal(hidden.grad[[2, 5, 10]], torch.zeros(3, 8))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=3), reference.detach())


@pytest.mark.parametrize(
    "head",
    [
        {"softcap": 5.0},
        {"scale": 1 / 8},
        {"scale": 0.5, "softcap": 3.0},
        {"bias": True},
        {"bias": True, "softcap": 2.0},
    ],
    ids=["gemma soft-cap", "granite scale", "cohere scale + cap", "head bias", "bias + cap"],
)
def test_fused_loss_applies_the_familys_head_to_value_and_every_gradient(head):
    from layermoe_ds.modeling.lm_loss import Head

    torch.manual_seed(0)
    hidden = (torch.randn(13, 8) * 3).requires_grad_(True)
    weight = (torch.randn(50, 8) * 2).requires_grad_(True)
    bias = torch.randn(50).requires_grad_(True) if head.pop("bias", False) else None
    targets = torch.randint(0, 50, (13,))
    targets[[3, 9]] = IGNORE_INDEX
    spec = Head(bias=bias, **head)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4, head=spec)
    loss.backward()
    ours = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    for tensor in (hidden, weight, bias):
        if tensor is not None:
            tensor.grad = None
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits * head.get("scale", 1.0)
    if "softcap" in head:
        logits = torch.tanh(logits / head["softcap"]) * head["softcap"]
    reference = torch.nn.functional.cross_entropy(logits, targets)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    references = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    for mine, expected in zip(ours, references, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_a_head_the_fused_loss_does_not_know_is_refused(tiny_base, monkeypatch):
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.modeling import families
    from layermoe_ds.modeling.lm_loss import check_fused_loss

    model = load_causal_lm(tiny_base, torch.float32, "cpu")
    assert check_fused_loss(model, "train.model") < 1e-5
    model.config.logits_scaling = 4.0  # a field Llama's head does not read: the family table says so
    assert check_fused_loss(model, "train.model") < 1e-5
    # a table entry that says the head divides by it — and the model's own forward does not
    wrong = families.Family(head=families.HeadFields(divide_by="logits_scaling"))
    monkeypatch.setitem(families.FAMILIES, "llama", wrong)
    with pytest.raises(ValueError, match=r"train.model: LlamaForCausalLM's own loss and the fused loss differ by"):
        check_fused_loss(model, "train.model")


def test_targets_and_chunk_size():
    assert shifted_targets(torch.tensor([[1, 2, 3], [4, 5, 6]])).tolist() == [2, 3, -100, 5, 6, -100]
    assert chunk_tokens_for(151_936) == 220 and chunk_tokens_for(10**12) == 1


def test_lean_swiglu_trains_to_the_bit(upcycled):
    """Two activations kept instead of three, the same gradients: the upcycled model's every FFN (expert 0 and the
    new experts) with the lean forward gives bit-identical loss and gradients."""
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.training.lean_ffn import use_lean_ffn

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = load_causal_lm(upcycled, torch.float32, "cpu")
    ref_loss, ref_grads = _grads(reference, ids)
    model = load_causal_lm(upcycled, torch.float32, "cpu")
    assert use_lean_ffn(model) == 3 + (3 + 2 + 3 - 3)  # a base FFN per layer, and every new expert
    loss, grads = _grads(model, ids)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_evaluation_nll_without_logits_matches_the_logits(tiny_base):
    """Evaluation's summed NLL through the hidden states equals the one through the full logits, padding included."""
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.modeling.lm_loss import model_nll

    model = load_causal_lm(tiny_base, torch.float32, "cpu").eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(model_nll(model, ids[:, :-1], mask[:, :-1], targets), expected)
