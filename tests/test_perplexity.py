import math

import pytest
import torch

from layermoe_ds.eval.perplexity import format_table, group_averages, language_nll, summarise
from tests.helpers import CharTokenizer, token_streams


class UniformLM(torch.nn.Module):
    """Predicts every token with probability 1/V: NLL per token is exactly ln V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, attention_mask):
        self.seen.append(input_ids.clone())
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def char_tokenizer():
    """One token a character, vocabulary 60 (the uniform model's)."""
    return CharTokenizer(vocab=60)


@pytest.mark.parametrize("seq_len", [3, 4, 100])
def test_every_token_is_predicted_once_and_bpb_is_exact(seq_len, tmp_path):
    texts = ["hello", "wörld", "ok"]  # 5 + 5 + 2 characters, "ö" is 2 bytes
    stream = token_streams(tmp_path, {"en": texts}, char_tokenizer())["en"]
    stats = language_nll(UniformLM(60), char_tokenizer(), stream, seq_len, batch_size=2)
    assert stats["tokens"] == 12 + 3  # every character and every EOS, each predicted once
    assert stats["bytes"] == 13 + 3
    assert stats["nll"] == pytest.approx(15 * math.log(60), rel=1e-6)
    summary = summarise(stats)
    assert summary["bpb"] == pytest.approx(15 * math.log2(60) / 16)
    assert summary["ppl"] == pytest.approx(60, rel=1e-5)


def test_group_averages_and_table():
    results = {
        "en": {"loss": 1.0, "bpb": 0.5, "ppl": 2.7, "tokens": 10},
        "ru": {"loss": 3.0, "bpb": 1.5, "ppl": 20.0, "tokens": 10},
        "el": {"loss": 5.0, "bpb": 2.5, "ppl": 148.0, "tokens": 10},
    }
    averages = group_averages(results, ["en"], ["ru", "el"])
    assert averages == {"old_avg": {"loss": 1.0, "bpb": 0.5}, "new_avg": {"loss": 4.0, "bpb": 2.0}}
    table = format_table(results, ["en"], ["ru", "el"])
    assert "new_avg" in table and "ru       new" in table
