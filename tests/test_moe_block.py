"""The LayerMoE block: gate semantics, the fast dispatch against a per-expert loop, and losses."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from layermoe_ds.modeling.remote.layermoe_block import (
    LayerMoEBlock,
    LayerMoEGate,
    dense_dispatch,
    expert_load,
    grouped_dispatch,
    prefix_mean,
)


class Cfg:
    hidden_size, intermediate_size, hidden_act, mlp_bias = 16, 24, "silu", False


def make_block(groups=(0, 1, 1, 1, 1), top_k=2, classes=2, mode="per-token", seed=0) -> LayerMoEBlock:
    torch.manual_seed(seed)
    base = LlamaMLP(Cfg())
    new = []
    for _ in groups[1:]:
        expert = LlamaMLP(Cfg())
        new.append(expert)
    block = LayerMoEBlock([base, *new], LayerMoEGate(groups, top_k, mode), 16, classes)
    torch.nn.init.normal_(block.router.weight, std=0.5)
    if block.classifier is not None:
        torch.nn.init.normal_(block.classifier.weight, std=0.5)
    return block


def route(block: LayerMoEBlock, x_BTH: torch.Tensor, classifier_routing=None, force_base=None, max_group=None):
    """The block's gate on its own weights."""
    classifier = None if block.classifier is None else block.classifier.weight
    routing = block.classifier_routing if classifier_routing is None else classifier_routing
    force = block.force_base if force_base is None else force_base
    return block.gate(x_BTH, block.router.weight, classifier, routing, force, max_group)


def loop_reference(block: LayerMoEBlock, x_BTH: torch.Tensor) -> torch.Tensor:
    """The slow twin: for each token and each of its slots, run that expert on that one token."""
    routing, _ = route(block, x_BTH, max_group=block.max_group)
    experts = list(block.experts)
    x_TH = x_BTH.reshape(-1, 16)
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e, w in zip(routing.expert_ids_TK[t].tolist(), routing.weights_TK[t], strict=True):
            if e >= 0:
                out[t] += w * experts[e](x_TH[t : t + 1])[0]
    return out.reshape(x_BTH.shape)


@pytest.mark.parametrize("length,accelerator", [(7, False), (7, True), (40, True)], ids=["cpu", "accel", "grouped"])
@pytest.mark.parametrize("top_k,classifier_routing", [(1, False), (2, False), (2, True), (3, True)])
def test_fast_dispatch_equals_per_expert_loop(top_k, classifier_routing, length, accelerator, monkeypatch):
    """21 tokens: grouped by expert on the CPU, every expert on every token where an accelerator would be; 120:
    grouped by expert everywhere."""
    from layermoe_ds.modeling.remote import layermoe_block

    if accelerator:
        monkeypatch.setattr(layermoe_block.torch.compiler, "is_compiling", lambda: True)  # as on a GPU
    assert layermoe_block.dense_for(torch.zeros(3 * length, 16)) == (accelerator and length == 7)
    block = make_block(top_k=top_k)
    block.classifier_routing = classifier_routing
    x = torch.randn(3, length, 16)
    torch.testing.assert_close(block(x), loop_reference(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["grouped", "dense"])
def test_dispatch_on_random_routes_matches_loop(dispatch):
    torch.manual_seed(1)
    experts = [torch.nn.Linear(8, 8) for _ in range(5)]
    x = torch.randn(50, 8)
    ids = torch.randint(-1, 5, (50, 3))
    w = torch.rand(50, 3)
    if dispatch == "grouped":
        out = grouped_dispatch(x, ids, w, experts, expert_load(ids, 5).tolist())
    else:
        out = dense_dispatch(x, ids, w, experts)
    ref = torch.zeros(50, 8)
    for t in range(50):
        for k in range(3):
            if ids[t, k] >= 0:
                ref[t] += w[t, k] * experts[ids[t, k]](x[t])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_topk_weights_renormalise_and_k_clips_to_n():
    block = make_block(groups=(0, 1), top_k=2, classes=0)
    routing, aux = route(block, torch.randn(2, 5, 16), classifier_routing=False)
    assert routing.expert_ids_TK.shape == (10, 2)  # N = 2 uses both
    assert torch.equal(routing.expert_ids_TK.sort(dim=1).values, torch.tensor([[0, 1]] * 10))
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(10))
    block3 = make_block(top_k=3, classes=0)
    routing, aux = route(block3, torch.randn(4, 16)[None], classifier_routing=False)
    probs = aux.router_log_probs_TE.exp()
    chosen = probs.gather(1, routing.expert_ids_TK)
    torch.testing.assert_close(routing.weights_TK, chosen / chosen.sum(-1, keepdim=True))
    assert aux.router_log_probs_TE.dtype == torch.float32


def test_old_class_goes_to_expert0_alone_and_lifelong_classes_are_restricted():
    block = make_block(groups=(0, 1, 1, 2, 2), classes=3)
    x = torch.randn(2, 9, 16)
    routing, aux = route(block, x, classifier_routing=True)
    cls = aux.classifier_logits_TG.argmax(-1)
    ids, w = routing.expert_ids_TK, routing.weights_TK
    for t in range(ids.shape[0]):
        used = [e for e in ids[t].tolist() if e >= 0]
        if cls[t] == 0:
            assert used == [0] and w[t, ids[t].tolist().index(0)] == 1.0
        else:
            assert all(block.gate.expert_groups[e] <= cls[t] for e in used)
    assert set(cls.tolist()) >= {0, 1} or len(set(cls.tolist())) >= 2  # the random classifier uses several classes


def test_force_base_reproduces_the_dense_ffn_exactly():
    block = make_block()
    block.force_base = True
    x = torch.randn(2, 6, 16)
    assert torch.equal(block(x), block.experts[0](x))


def test_balance_loss_uses_the_layers_own_expert_count():
    block = make_block(groups=(0, 1, 1), top_k=1, classes=0)
    torch.nn.init.zeros_(block.router.weight)  # uniform router: P_e = 1/N; top-1 ties all pick expert 0
    _, aux = route(block, torch.randn(1, 4, 16), classifier_routing=False)
    # f = (1, 0, 0), P = (1/3, 1/3, 1/3) → N Σ f P = 3 · 1/3 = 1
    assert aux.balance_loss.item() == pytest.approx(1.0)
    block5 = make_block(groups=(0, 1, 1, 1, 1), top_k=1, classes=0)
    torch.nn.init.zeros_(block5.router.weight)
    _, aux5 = route(block5, torch.randn(1, 4, 16), classifier_routing=False)
    assert aux5.balance_loss.item() == pytest.approx(1.0)


def test_prefix_mean_is_causal():
    x = torch.randn(2, 5, 4)
    pm = prefix_mean(x)
    torch.testing.assert_close(pm[:, 2], x[:, :3].mean(1))
    y = x.clone()
    y[:, 3:] += 100.0  # changing the future does not change earlier positions
    torch.testing.assert_close(prefix_mean(y)[:, :3], pm[:, :3])


def test_prefix_mean_classifier_does_not_leak_future_tokens():
    block = make_block(mode="prefix-mean")
    block.classifier_routing = True
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(block(x)[:, :5], block(y)[:, :5])


def test_block_records_aux_for_the_loop():
    block = make_block()
    block.classifier_routing = False  # every token uses both slots
    x = torch.randn(2, 3, 16)
    block(x)
    aux = block.aux
    assert aux.router_log_probs_TE.shape == (6, 5) and aux.classifier_logits_TG.shape == (6, 2)
    assert int(aux.expert_load_E.sum()) == 12 and aux.dropped == 0
    aux.balance_loss.backward()
    assert block.router.weight.grad is not None


@pytest.mark.gpu
def test_block_on_cuda_in_bf16_matches_cpu_fp32():
    """The block's dispatch on a GPU in bf16 (the training precision) gives the CPU fp32 output within bf16's
    precision, and the same routes."""
    block = make_block(top_k=2)
    x = torch.randn(4, 33, 16)
    expected = block(x)
    routes = route(block, x, False, False, block.max_group)[0].expert_ids_TK
    gpu = block.to("cuda", torch.bfloat16)
    x_gpu = x.to("cuda", torch.bfloat16)
    torch.testing.assert_close(gpu(x_gpu).float().cpu(), expected, atol=5e-2, rtol=5e-2)
    gpu_routes = route(gpu, x_gpu, False, False, gpu.max_group)[0].expert_ids_TK.cpu()
    assert (gpu_routes == routes).float().mean() > 0.95  # bf16 may flip a near tie


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_gemm_and_weighted_add_give_autograds_gradients(dtype):
    from layermoe_ds.modeling.remote.layermoe_block import fp32_linear, scaled_index_add

    torch.manual_seed(0)
    x, w = torch.randn(7, 5).to(dtype).requires_grad_(), torch.randn(3, 5).requires_grad_()
    out, index = torch.randn(6, 4).requires_grad_(), torch.tensor([0, 2, 2, 5])
    routed, weight = torch.randn(4, 4).to(dtype).requires_grad_(), torch.randn(4).requires_grad_()
    ours = [t.detach().clone().requires_grad_() for t in (x, w, out, routed, weight)]
    g1, g2 = torch.randn(7, 3), torch.randn(6, 4)
    (fp32_linear(ours[0], ours[1]) * g1).sum().backward()
    (scaled_index_add(ours[2], index, ours[3], ours[4]) * g2).sum().backward()
    (torch.nn.functional.linear(x.float(), w.float()) * g1).sum().backward()
    (out.index_add(0, index, routed.float() * weight[:, None]) * g2).sum().backward()
    for mine, reference in zip(ours, (x, w, out, routed, weight), strict=True):
        assert mine.grad.dtype == reference.grad.dtype
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [7, 40])
def test_bf16_block_saves_no_fp32_copy_of_its_tokens(length):
    """What autograd keeps for backward: the router's and classifier's input and the experts' outputs in bf16, not
    their fp32 upcasts (each [T, H], 4 bytes an element)."""
    block = make_block().to(torch.bfloat16)
    x = torch.randn(2, length, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(x)
    assert saved and not [t.shape for t in saved if t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == 16]
