"""`layermoe demo`: the pipeline on the embedded corpus, each step cached so a rerun picks up where it stopped."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from layermoe_ds.config import PretrainConfig
from layermoe_ds.data.corpus import CorpusOptions, build_corpus, corpus_is_built
from layermoe_ds.io import read_json, write_json

log = logging.getLogger(__name__)

OLD_LANGS = ("en", "de")
NEW_LANGS = ("fr", "ru", "el")
TOKENIZER_MARKER = "layermoe_tokenizer.json"


def ensure_tokenizer(data: Path, out: Path, langs: tuple[str, ...], vocab: int = 8000) -> Path:
    from layermoe_ds.data.tokenizer import train_tokenizer

    marker = out / TOKENIZER_MARKER
    wanted = {
        "data": str(data.resolve()),
        "langs": list(langs),
        "vocab": vocab,
        "corpus_manifest": read_json(data / "manifest.json", "corpus manifest")["files"],
    }
    if marker.is_file() and read_json(marker, "tokenizer marker") == wanted:
        return out
    train_tokenizer(data, langs, out, vocab)
    write_json(marker, wanted)
    return out


def run_demo(data: Path, artifacts: Path, runs: Path, cache: Path) -> int:
    from layermoe_ds.data.loading import load_texts
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.eval.perplexity import evaluate_languages, format_table, group_averages
    from layermoe_ds.modeling.hf_loading import load_causal_lm
    from layermoe_ds.training.pretrain import is_done, pretrain

    started = time.perf_counter()
    langs = OLD_LANGS + NEW_LANGS
    options = CorpusOptions(langs=langs)
    if not corpus_is_built(data, options):
        print(f"[1/3] building the corpus in {data} from Debian's libreoffice-help packages …", flush=True)
        build_corpus(data, cache, options)
    print(f"[2/3] tokenizer in {artifacts / 'tokenizer'} …", flush=True)
    tokenizer_dir = ensure_tokenizer(data, artifacts / "tokenizer", langs)
    base = artifacts / "base"
    config = PretrainConfig(langs=OLD_LANGS)
    if not is_done(base, config, tokenizer_dir, data):
        print(f"[3/3] pretraining the dense base model on {','.join(OLD_LANGS)} ({config.steps} steps) …", flush=True)
        pretrain(config, data, tokenizer_dir, base)
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base)
    results = evaluate_languages(model, tokenizer, load_texts(data, langs, "test"), config.seq_len)
    runs.mkdir(parents=True, exist_ok=True)
    write_json(
        runs / "eval_base.json",
        {"model": str(base), "split": "test", "languages": results, **group_averages(results, OLD_LANGS, NEW_LANGS)},
    )
    print("\nDense base model, held-out test split (old = trained languages, new = to be added):")
    print(format_table(results, OLD_LANGS, NEW_LANGS))
    print(f"\nresults: {runs / 'eval_base.json'}   wall time: {time.perf_counter() - started:.0f} s")
    return 0
