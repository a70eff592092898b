"""Loading a model's Hugging Face tokenizer, with the tokens the data path needs (EOS; a pad token)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from layermoe_ds.errors import InputError, MissingInputError


def load_tokenizer(path: Path):
    """Load any HF tokenizer directory; make sure it has EOS (document separator) and a pad token."""
    # The one import from data/ into modeling/, here and not at the top: a LayerMoE model directory's tokenizer
    # loads without a remote-code prompt once its config class is registered (`layermoe_model_type` does that).
    from layermoe_ds.modeling.types import layermoe_model_type

    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"tokenizer: {path} is not a directory")
    if (path / "config.json").is_file():
        layermoe_model_type(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer: {path} has no EOS token (needed to separate documents)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
