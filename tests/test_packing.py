import pytest
import torch

from layermoe_ds.data.packing import BlockDataset, BlockSampler, block_part
from tests.helpers import CharTokenizer, token_streams


def test_stream_joins_documents_with_eos(tmp_path):
    streams = token_streams(tmp_path, {"en": ["ab", "c"]}, CharTokenizer())
    assert streams["en"].read(0, 5).tolist() == [97, 98, 0, 99, 0]
    assert streams["en"].read(1, 4).tolist() == [98, 0, 99]


def test_blocks_carry_language_labels(tmp_path):
    streams = token_streams(tmp_path, {"en": ["abcdefg"], "ru": ["жзийклмнопр"]}, CharTokenizer())
    parts = [block_part("ru", 0, streams["ru"], 4), block_part("en", 1, streams["en"], 4)]
    blocks = BlockDataset(parts, 4)
    assert len(blocks) == 3 + 2
    ids, labels = blocks.batch(torch.arange(5))
    assert ids.shape == (5, 4) and ids.dtype == torch.long
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert ids[4].tolist() == [101, 102, 103, 0]
    assert blocks.tokens_per_lang == {"en": 8, "ru": 12}
    # A limit keeps the first blocks only; a batch reads just its blocks' tokens from the shards.
    assert block_part("ru", 0, streams["ru"], 4, max_tokens=9).blocks == 2
    before = streams["ru"].tokens_read
    blocks.batch(torch.tensor([1]))
    assert streams["ru"].tokens_read - before == 4


def test_too_little_text_for_a_block(tmp_path):
    streams = token_streams(tmp_path, {"en": ["ab"]}, CharTokenizer())
    with pytest.raises(ValueError, match="'en' has 3 tokens"):
        block_part("en", 0, streams["en"], 8)


def test_sampler_resumes_with_the_same_batches():
    a = BlockSampler(50, 4, seed=3)
    first = [a.next_indices() for _ in range(20)]  # crosses an epoch boundary (12 batches per epoch)
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(7)]
    b = BlockSampler(50, 4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [b.next_indices() for _ in range(7)], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first[:7], expected, strict=True))


def test_sampler_ranks_are_disjoint_and_seeded():
    ranks = [BlockSampler(40, 5, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        a, b = (s.next_indices() for s in ranks)
        assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())


def test_sampler_rejects_other_data():
    state = BlockSampler(50, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="data or seed changed"):
        BlockSampler(51, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="exceeds the 6 blocks"):
        BlockSampler(6, 4, seed=0, world_size=2)
