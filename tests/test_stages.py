"""The declared freeze table and the stage losses, on a lifelong (grown) model — no DeepSpeed launch needed."""

import pytest
import torch

from layermoe_ds.modeling.upcycle import grow, upcycle
from layermoe_ds.training.losses import LossWeights, lpr_loss, stage_losses
from layermoe_ds.training.stages import apply_stage
from tests.test_upcycle import ALLOCATION, IDS, tiny_dense


@pytest.fixture(scope="module")
def grown():
    model = upcycle(tiny_dense("llama"), ALLOCATION)
    return grow(model, {"experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1]})


def test_stage1_of_a_lifelong_step_trains_only_the_newest_groups_experts_and_routers(grown):
    groups = apply_stage(grown, 1)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    for layer, block in grown.moe_blocks().items():
        assert f"model.layers.{layer}.mlp.router.weight" in trainable
        for k, group in enumerate(block.gate.expert_groups):
            name = f"model.layers.{layer}.mlp.experts.{k}.up_proj.weight"
            assert (name in trainable) == (group == 2), name
    assert not [n for n in trainable if "experts.0." in n or "embed" in n or "self_attn" in n or "classifier" in n]
    assert {k: len(v) for k, v in groups.items()} == {"routers": 4, "new_experts": 3 * 4}  # 1+2+0+1 group-2 experts


def test_stage2_trains_routers_and_classifiers_only(grown):
    apply_stage(grown, 2)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".classifier." in n for n in trainable)
    assert sum(".classifier." in n for n in trainable) == 3


def test_lpr_is_minus_log_prob_of_allowed_experts():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]))
    groups = [0, 1, 2]
    token_group = torch.tensor([0, 1, 2])  # the last token is of the newest group: no LPR term
    total, count = lpr_loss(log_probs, groups, token_group, newest_group=2)
    assert count == 2
    assert total.item() == pytest.approx(-(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.7))).item())


def test_stage_losses_combine_with_the_coefficients(grown):
    grown.set_classifier_routing(True)
    output = grown(IDS, labels=IDS)
    token_groups = torch.tensor([[0] * 12, [2] * 12])
    s1 = stage_losses(grown, output.loss, token_groups, 1, LossWeights(0.01, 0.1, 0.1))
    assert s1.total.item() == pytest.approx((output.loss + 0.01 * s1.balance).item())
    s2 = stage_losses(grown, output.loss, token_groups, 2, LossWeights(0.01, 0.1, 0.1))
    assert s2.total.item() == pytest.approx((output.loss + 0.1 * s2.lpr + 0.1 * s2.cls).item())
    assert s2.lpr.item() > 0 and s2.cls.item() > 0 and s2.cls_count == 3 * 24


def test_the_router_anchor_is_zero_at_stage_1s_routers_and_pulls_back_the_newest_groups_routing():
    from layermoe_ds.training.router_anchor import RouterAnchor, anchor_loss

    model = upcycle(tiny_dense("llama"), ALLOCATION)
    model.set_classifier_routing(True)
    anchor = RouterAnchor(model)  # the routers as built: stage 1's
    token_groups = torch.tensor([[0] * 12, [1] * 12])  # one old row, one of the newest group
    output = model(IDS, labels=IDS)
    at_start = stage_losses(model, output.loss, token_groups, 2, LossWeights(0.01, 0.1, 0.1, 1.0), anchor=anchor)
    assert at_start.anchor.item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():  # a router moved since stage 1: the anchor counts the newest group's tokens only
        for block in model.moe_blocks().values():
            block.router.weight.add_(0.5 * torch.randn_like(block.router.weight))
    output = model(IDS, labels=IDS)
    moved = stage_losses(model, output.loss, token_groups, 2, LossWeights(0.01, 0.1, 0.1, 2.0), anchor=anchor)
    assert moved.anchor.item() > 0
    assert moved.total.item() == pytest.approx(
        (output.loss + 0.1 * moved.lpr + 0.1 * moved.cls + 2 * moved.anchor).item()
    )
    moved.anchor.backward()
    assert all(b.router.weight.grad is not None for b in model.moe_blocks().values())
    # KL(reference ‖ current), summed over the newest group's tokens only
    reference = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    current = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    total, count = anchor_loss(current, reference, torch.tensor([0, 1]), newest_group=1)
    assert count == 1 and total.item() == pytest.approx(0.0, abs=1e-6)
    total, count = anchor_loss(current, reference, torch.tensor([1, 0]), newest_group=1)
    expected = 0.5 * (torch.log(torch.tensor(0.5 / 0.9)) + torch.log(torch.tensor(0.5 / 0.1)))
    assert count == 1 and total.item() == pytest.approx(expected.item(), rel=1e-5)
