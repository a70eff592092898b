"""DeepSpeed expert parallelism on gloo ranks equals the single-process block (forward and backward): 2 ranks at
ep 2, and 4 ranks at ep 2, where each expert lives on two ranks (an expert-data-parallel group of 2)."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import free_port
from tests.test_moe_block import make_block

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, port: int, ep_size) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from layermoe_ds.ds.moe_layer import block_to_expert_parallel, choose_ep_size
    from layermoe_ds.ds.placement import expert_placement

    deepspeed.init_distributed(dist_backend="gloo")
    reference = make_block(groups=(0, 1, 1, 1, 1), classes=2, seed=0)
    for g, expert in enumerate(reference.experts[1:]):  # make the copies distinct, seeded by expert id
        torch.manual_seed(100 + g)
        for p in expert.parameters():
            p.data.add_(torch.randn_like(p) * 0.3)
    reference.classifier_routing = True
    parallel = copy.deepcopy(reference)
    assert block_to_expert_parallel(parallel, 16, world, ep_size=ep_size, drop_tokens=False) == 2
    assert choose_ep_size(3, 2) == 1 and choose_ep_size(4, 2, trainable=1) == 1
    assert expert_placement([1, 1, 2, 2], 2) == [0, 2, 1, 3]  # each rank: one G1 and one G2 expert
    with pytest.raises(ValueError, match="does not divide layer 4's 3 new experts"):
        choose_ep_size(3, 2, requested=2, layer=4)

    inputs = [torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    projection = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(99))
    out = parallel(inputs[rank])
    (out * projection).sum().backward()
    full = reference(torch.cat(inputs))
    (full * projection.repeat(world, 1, 1)).sum().backward()
    torch.testing.assert_close(out, full[rank * 3 : (rank + 1) * 3], atol=1e-5, rtol=1e-5)

    # An expert's gradient sums the tokens of its expert-parallel group (the all-to-all brought them); its replicas
    # in the expert-data-parallel group (ranks r and r + 2 at world 4) together hold every rank's: DeepSpeed's
    # engine sums them so, as here.
    assert parallel.moe.global_ids == [[0, 2], [1, 3]][rank % 2]  # dealt round-robin over an ep group's ranks
    replicas = groups._get_expert_data_parallel_group(parallel.moe.expert_group_name)
    assert dist.get_world_size(replicas) == world // 2
    for expert, global_id in zip(parallel.moe.experts, parallel.moe.global_ids, strict=True):
        twin = reference.experts[1 + global_id]
        for p, q in zip(expert.parameters(), twin.parameters(), strict=True):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=replicas)
            torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=1e-4)
    # Replicated tensors (router, classifier, expert 0): data-parallel sum of the per-rank gradients.
    for p, q in zip(
        [parallel.router.weight, parallel.classifier.weight, *parallel.base_ffn.parameters()],
        [reference.router.weight, reference.classifier.weight, *reference.experts[0].parameters()],
        strict=True,
    ):
        if q.grad is None:
            assert p.grad is None
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=1e-4)
    assert parallel.aux.dropped == 0

    # Training with a tight capacity drops routes and counts them; evaluation never drops.
    reference.aux = None  # recorded tensors with autograd history cannot be deep-copied
    tight = copy.deepcopy(reference)
    block_to_expert_parallel(tight, 16, world, capacity_factor=0.25, min_capacity=1, drop_tokens=True)
    tight.classifier_routing = False
    tight(inputs[rank])
    assert tight.aux.dropped > 0
    tight.eval()
    with torch.no_grad():
        evaluated = tight(inputs[rank])
    assert tight.aux.dropped == 0
    # Training is dropless by default (TrainConfig's default, as the reference trains): the same tight capacity
    # factor drops nothing.
    import dataclasses

    from layermoe_ds.config import TrainConfig

    default_drop = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["drop_tokens"]
    dropless = copy.deepcopy(reference)
    block_to_expert_parallel(dropless, 16, world, capacity_factor=0.25, min_capacity=1, drop_tokens=default_drop)
    dropless.classifier_routing = False
    dropless(inputs[rank])
    assert dropless.aux.dropped == 0
    with torch.no_grad():
        reference.classifier_routing = False
        torch.testing.assert_close(evaluated, reference(inputs[rank]), atol=1e-5, rtol=1e-5)
    dist.destroy_process_group()


@pytest.mark.parametrize("world, ep_size", [(2, "auto"), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_expert_parallel_block_equals_single_process(world, ep_size):
    mp.spawn(_worker, args=(world, free_port(), ep_size), nprocs=world)
