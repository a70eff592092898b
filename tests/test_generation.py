"""Generation with a LayerMoE model whose classifiers read the running mean of the prefix (`prefix-mean`): every
cached step equals the full forward pass, padding never enters the mean, and beam search and assisted decoding
keep the sums in step with the cache."""

from __future__ import annotations

import inspect

import pytest
import torch

from layermoe_ds.modeling.remote.prefix_state import STORE
from layermoe_ds.modeling.upcycle import upcycle
from tests.test_upcycle import ALLOCATION, perturb_new_experts, tiny_dense

PAD = 0


def cache_kw(model, past) -> dict:
    """The KV cache as the installed transformers names the argument: `cache` since 5.25, `past_key_values` before."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": past}


@pytest.fixture(scope="module")
def model():
    """Every layer's classifier decisive: class "old" sends a token to expert 0 alone, and the new experts differ."""
    model = upcycle(tiny_dense("llama"), ALLOCATION, classifier_mode="prefix-mean").eval()
    perturb_new_experts(model)
    torch.manual_seed(5)
    for block in model.moe_blocks().values():
        if block.classifier is not None:
            block.classifier.weight.data.normal_(0, 3.0)
    model.set_classifier_routing(True)
    model.generation_config.pad_token_id = PAD
    return model


def prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def classifier_classes(model, ids, attention_mask=None) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    return {layer: block.aux.classifier_logits_TG.argmax(-1) for layer, block in model.moe_blocks().items() if
            block.aux.classifier_logits_TG is not None}  # fmt: skip


def test_each_cached_step_equals_the_full_forward(model):
    ids = prompts(3, 7, seed=1)
    out = model.generate(
        ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True, use_cache=True
    )
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits
    cached = torch.stack(out.logits, dim=1)  # the logits each cached step produced
    torch.testing.assert_close(cached, full[:, ids.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)
    # the classifier decides differently for a good share of tokens (the test would see a wrong mean)
    classes = classifier_classes(model, out.sequences)
    assert all(0 < c.float().mean() < 1 for c in classes.values())


def test_the_cached_sums_are_what_the_full_forward_sees(model):
    """Decision by decision: feeding the sequence one token at a time through the cache gives the full forward's
    classifier logits at every layer and position."""
    ids = prompts(2, 10, seed=2)
    with torch.no_grad():
        model(input_ids=ids)
        full = {layer: block.aux.classifier_logits_TG.view(2, 10, -1) for layer, block in model.moe_blocks().items()
                if block.aux.classifier_logits_TG is not None}  # fmt: skip
        past, steps = None, {layer: [] for layer in full}
        for t in range(10):
            out = model(input_ids=ids[:, t : t + 1], **cache_kw(model, past), use_cache=True)
            past = out.past_key_values
            for layer in full:
                steps[layer].append(model.moe_blocks()[layer].aux.classifier_logits_TG.view(2, 1, -1))
    assert getattr(past, STORE)
    for layer in full:
        torch.testing.assert_close(torch.cat(steps[layer], dim=1), full[layer], atol=1e-5, rtol=1e-5)


def test_a_left_padded_batch_equals_one_by_one(model):
    short, long = prompts(1, 4, seed=3), prompts(1, 9, seed=4)
    batch = torch.cat([torch.cat([torch.full((1, 5), PAD), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], dim=1), torch.ones(1, 9)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False)
    alone = [model.generate(p, max_new_tokens=10, do_sample=False) for p in (short, long)]
    assert torch.equal(together[0, 5:], alone[0][0]) and torch.equal(together[1], alone[1][0])
    # the pad positions changed nothing: their classes differ from the unpadded prompt's only where they are pads
    padded = classifier_classes(model, batch, mask)
    unpadded = classifier_classes(model, short)
    for layer in unpadded:
        assert torch.equal(padded[layer].view(2, 9)[0, 5:], unpadded[layer])


def test_beam_search_and_assisted_decoding_match_the_uncached_model(model):
    ids = prompts(2, 6, seed=6)
    beams = [model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(*beams)
    draft = tiny_dense("llama")  # a weak draft: most of its proposals are rejected, and the cache is cropped back
    greedy = model.generate(ids[:1], max_new_tokens=10, do_sample=False)
    assisted = model.generate(ids[:1], max_new_tokens=10, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)


def test_a_cache_the_sums_do_not_cover_is_refused(model):
    ids = prompts(1, 5, seed=7)
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        delattr(past, STORE)
        with pytest.raises(ValueError, match="prefix-mean classifier: the cache holds 5 positions"):
            model(input_ids=ids[:, :1], **cache_kw(model, past), use_cache=True)
