"""Shared, session-scoped fixtures: a slice of the real corpus, a small tokenizer and a tiny trained base model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from layermoe_ds.ds.process import jit_build_env

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process DeepSpeed runs (and mp.spawn workers) build their op as the launched ranks do, with this environment's
# ninja and build directory: otherwise each alternation rebuilds it (~50 s).
jit_build_env(os.environ)
torch.set_num_threads(1)

CACHE = Path(os.environ.get("LAYERMOE_DEB_CACHE", Path.home() / ".cache" / "layermoe_ds" / "debs"))
OLD, NEW = ("en", "de"), ("fr", "ru", "el")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is, and are skipped, saying so, where it is not."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_log_handlers():
    """Drop the stream handlers a test's in-process `layermoe` command installed (`basicConfig(force=True)` on the
    stream pytest captured for that test): a later test's logging would write to that closed stream."""
    before = set(logging.root.handlers)
    yield
    for handler in [h for h in logging.root.handlers if h not in before and type(h) is logging.StreamHandler]:
        logging.root.removeHandler(handler)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A 300-page slice of the embedded corpus (all five languages), built from the real Debian packages."""
    from layermoe_testbed.corpus import CorpusOptions, build_corpus

    out = tmp_path_factory.mktemp("corpus")
    try:
        build_corpus(out, CACHE, CorpusOptions(langs=OLD + NEW, max_pages=300))
    except (RuntimeError, ValueError) as exc:  # InputError: apt-get missing or failing
        if "apt-get" in str(exc):
            pytest.skip(f"Debian's libreoffice-help packages cannot be fetched here: {exc}")
        raise
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    from layermoe_testbed.tokenizer_training import train_tokenizer

    return train_tokenizer(corpus_dir, OLD + NEW, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_config():
    from layermoe_testbed.pretrain_config import BaseModelConfig, PretrainConfig

    model = BaseModelConfig(
        num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, max_position=64
    )
    return PretrainConfig(
        model=model, langs=OLD, steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4, save_every=20, seed=0
    )


@pytest.fixture(scope="session")
def tiny_base(corpus_dir, tokenizer_dir, tiny_config, tmp_path_factory) -> Path:
    """A 3-layer, 32-wide Llama trained for 40 steps on en+de: cheap, but old languages already beat new ones."""
    from layermoe_testbed.pretrain import pretrain

    out = tmp_path_factory.mktemp("base") / "base"
    pretrain(tiny_config, corpus_dir, tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def upcycled(tiny_base, tmp_path_factory) -> Path:
    """The tiny base upcycled with 3, 2, 3 experts: 2, 1, 2 new, so layers 0 and 2 run expert-parallel on 2 ranks."""
    from layermoe_ds.cli import main

    tmp = tmp_path_factory.mktemp("upcycled")
    (tmp / "alloc.json").write_text(
        json.dumps({"method": "layermoe", "experts_per_layer": [3, 2, 3], "classifier_layers": [0, 2]})
    )
    assert (
        main(
            ["upcycle", "--model", str(tiny_base), "--allocation", str(tmp / "alloc.json"), "--out", str(tmp / "model")]
        )
        == 0
    )
    # A generation setting of its own, which the runs started from it must carry to what they write.
    generation = json.loads((tmp / "model" / "generation_config.json").read_text())
    (tmp / "model" / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 77}))
    return tmp / "model"


@pytest.fixture(scope="session")
def upcycled_wide(tiny_base, tmp_path_factory) -> Path:
    """The tiny base upcycled with 5, 3, 1 experts: on 2 ranks layer 0 holds two new experts a rank (DeepSpeed's
    slot numbers are not the experts' ids there), layer 2 stays dense."""
    from layermoe_ds.cli import main

    tmp = tmp_path_factory.mktemp("upcycled_wide")
    (tmp / "alloc.json").write_text(
        json.dumps({"method": "layermoe", "experts_per_layer": [5, 3, 1], "classifier_layers": [0, 1]})
    )
    upcycle = ["upcycle", "--model", str(tiny_base), "--allocation", str(tmp / "alloc.json")]
    assert main([*upcycle, "--out", str(tmp / "model")]) == 0
    return tmp / "model"


@pytest.fixture()
def single_rank(monkeypatch):
    from tests.helpers import free_port

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Runs killed before DeepSpeed's shm init completed can still leave segments: remove this session's that are
    over a minute old (a job unlinks its own within seconds of making them, and the other pytest worker's job may be
    making some right now: removing those would fail its ranks' start)."""
    import time

    from tests.helpers import shm_buffers

    before = shm_buffers()
    yield
    for path in shm_buffers() - before:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > 60:
                path.unlink()


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Raw text is tokenized into a cache (data/prepare.py): this session's, not the user's home."""
    path = tmp_path_factory.mktemp("token_cache")
    os.environ["LAYERMOE_DATA_CACHE"] = str(path)
    yield path
