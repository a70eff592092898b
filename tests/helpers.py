"""Helpers shared by tests."""

import json
import socket
import subprocess
import time
from pathlib import Path

import yaml

from layermoe_ds.ds.process import Launcher, cpu_launch_env, stage_command
from layermoe_ds.modeling.families import disk_expert

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "ds_configs" / "cpu.json"
GROUPS = [["en", "de"], ["fr", "ru", "el"]]


def new_expert(name: str) -> int:
    """The id of the new expert a tensor name on disk belongs to (`mlp.experts.K.…`, K ≥ 1), 0 for any other."""
    where = disk_expert(name)
    return where[1] if where else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """A CPU DeepSpeed launch from a test: the package's environment plus the checkout importable."""
    return cpu_launch_env(PYTHONPATH=str(ROOT), **extra)


def metrics(run_dir: Path) -> dict[int, dict]:
    """Step → record (a resumed run re-logs steps after its checkpoint: the last record wins)."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def command(
    stage: int,
    config: dict,
    run_yaml: Path,
    ds_json: str,
    ranks: int = 2,
    launcher=Launcher.TORCHRUN,
    extra_json=(),
    port: int | None = None,
):
    """The job's command line: torchrun by default (4-9 s less start-up than DeepSpeed's launcher, which the fault
    matrix, the cluster tests and the mini experiment go through); `extra_json` merged over cpu.json."""
    run_yaml.write_text(yaml.safe_dump(config))
    return stage_command(
        stage, run_yaml, ds_json, ranks, port or free_port(), cpu=True, extra_json=extra_json, launcher=launcher
    )


def shm_buffers() -> set[Path]:
    """DeepSpeed's CPU all-reduce segments in /dev/shm (the trainers unlink theirs once every rank has them)."""
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


def run(
    stage: int, config: dict, tmp: Path, ds_json: str, ranks: int = 2, extra_json=()
) -> subprocess.CompletedProcess:
    port = free_port()
    run_yaml = tmp / f"run_{time.monotonic_ns()}.yaml"
    result = subprocess.run(
        command(stage, config, run_yaml, ds_json, ranks, extra_json=extra_json, port=port),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(f"stage {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    # this job's segments (named by its port): the other pytest worker's jobs may hold some of their own right now
    left = sorted(path for path in shm_buffers() if f"_{port}_" in path.name)
    assert not left, f"the run left {left} in /dev/shm"
    return result


def base_config(model: Path, corpus: Path, out: Path, **overrides) -> dict:
    config = {
        "model": str(model),
        "data": str(corpus),
        "out": str(out),
        "language_groups": GROUPS,
        "steps": 30,
        "seq_len": 32,
        "lr": 3e-3,
        "save_every": 10,
        "log_every": 10,
        "seed": 0,
    }
    config.update(overrides)
    return config


def launch_in_process(stage: int, config: dict, tmp: Path, ds_json: str, capsys) -> tuple[int, str]:
    from layermoe_ds.training.launch import main

    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    code = main(
        stage, ["--config", str(tmp / "run.yaml"), "--deepspeed_config", str(ROOT / "ds_configs" / ds_json), str(CPU)]
    )
    return code, capsys.readouterr().err.strip()


class CharTokenizer:
    """One token per character (code point mod `vocab`, above the specials); EOS = 0, pad = 1."""

    eos_token_id, pad_token_id = 0, 1

    def __init__(self, vocab: int = 1200, offset: int = 0):
        self.vocab, self.offset = vocab, offset

    def ids(self, text: str) -> list[int]:
        return [(ord(c) - self.offset) % self.vocab for c in text]

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": self.ids(texts)}
        return {"input_ids": [self.ids(t) for t in texts]}

    def __len__(self):
        return self.vocab

    def get_vocab(self):
        return {f"c{self.offset}_{i}": i for i in range(self.vocab)}


def token_streams(tmp: Path, docs: dict[str, list[str]], tokenizer, split: str = "train") -> dict:
    """language → TokenStream of `docs` (one jsonl file a language), prepared with `tokenizer` in this process."""
    from layermoe_ds.data.loading import raw_sources
    from layermoe_ds.data.prepare import tokenize
    from layermoe_ds.data.streams import open_streams

    raw, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
    raw.mkdir(parents=True, exist_ok=True)
    for lang, texts in docs.items():
        (raw / f"{lang}.{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenize(raw_sources(raw, list(docs), [split]), raw, prepared, tokenizer=tokenizer, progress=False)
    return open_streams(prepared, tokenizer, raw, list(docs), split)
