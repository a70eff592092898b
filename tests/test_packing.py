import pytest
import torch

from layermoe_ds.data.packing import BlockSampler, pack_blocks, token_stream


class CharTokenizer:
    """One token per character; EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_stream_joins_documents_with_eos_and_cuts():
    tok = CharTokenizer()
    assert token_stream(tok, ["ab", "c"]) == [97, 98, 0, 99, 0]
    assert token_stream(tok, ["ab", "c"], max_tokens=4) == [97, 98, 0, 99]


def test_blocks_carry_language_labels():
    tok = CharTokenizer()
    blocks = pack_blocks(tok, {"en": ["abcdefg"], "ru": ["жзийклмнопр"]}, seq_len=4, lang_index=["ru", "en"])
    assert blocks.input_ids_NL.shape == (2 + 3, 4)
    assert blocks.lang_ids_NL[:2].unique().tolist() == [1] and blocks.lang_ids_NL[2:].unique().tolist() == [0]
    assert blocks.input_ids_NL[1].tolist() == [101, 102, 103, 0]
    assert blocks.tokens_per_lang == {"en": 8, "ru": 12}
    assert blocks.bytes_per_lang == {"en": 8, "ru": 23}


def test_too_little_text_for_a_block():
    with pytest.raises(ValueError, match="'en' has 3 tokens"):
        pack_blocks(CharTokenizer(), {"en": ["ab"]}, seq_len=8)


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
