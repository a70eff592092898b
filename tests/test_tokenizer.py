from transformers import AutoTokenizer


def test_tokenizer_loads_with_autotokenizer_and_round_trips(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 1000
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    for text in ["Open the file menu.", "Öffnen Sie die Datei.", "Откройте файл.", "Ανοίξτε το αρχείο.", "x 😀 ∮"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # byte fallback: a character never seen in training is encoded, not mapped to <unk>
    assert tok.unk_token_id not in tok("𝔘", add_special_tokens=False)["input_ids"]


def test_every_language_gets_real_pieces(tokenizer_dir, corpus_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for lang in ("en", "de", "fr", "ru", "el"):
        text = (corpus_dir / f"{lang}.valid.txt").read_text()[:3000]
        chars_per_token = len(text) / len(tok(text, add_special_tokens=False)["input_ids"])
        assert chars_per_token > 1.2, lang  # byte fallback alone would give ≤ 1 (Cyrillic, Greek: 0.5)
