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
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        byte_share = sum(p.startswith("<0x") for p in pieces) / len(pieces)
        assert byte_share < 0.02, (lang, byte_share)  # the script is covered by real pieces, not byte fallback
        assert len(text) / len(pieces) > 1.0, lang


def test_training_is_deterministic(tokenizer_dir, corpus_dir, tmp_path):
    from layermoe_testbed.tokenizer_training import train_tokenizer

    again = train_tokenizer(corpus_dir, ("en", "de", "fr", "ru", "el"), tmp_path / "again", vocab_size=1000)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
