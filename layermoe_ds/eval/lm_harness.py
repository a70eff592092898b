"""Local lm-evaluation-harness tasks over held-out text (the optional `[eval]` extra).

Hub datasets are out of reach on an offline cluster, so `layermoe lm-eval-tasks` writes one perplexity task per
language (`loglikelihood_rolling`: word/byte perplexity and bits per byte) over local files, and a group that runs
them all. The text goes through the same loader as training and `layermoe evaluate` (every supported data layout,
the same errors), and is copied next to the task files as `<lang>.<split>.jsonl`, so the task directory needs
nothing else (its YAML files name the copies by absolute path: write it where it will be used). Any model lm-eval
can load then runs on them, a LayerMoE export included:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path TASKS --tasks layermoe_heldout
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from layermoe_ds.io import atomic_write_text

GROUP = "layermoe_heldout"


def task_name(lang: str) -> str:
    return f"{GROUP}_{lang}"


def write_tasks(data: Path, langs: Sequence[str], out: Path, split: str = "test") -> list[str]:
    """Write the per-language tasks and their group into `out`; returns the task names (the group last)."""
    from layermoe_ds.data.loading import load_texts

    texts = load_texts(Path(data), list(langs), split)  # validates languages, split, encoding before writing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for lang, docs in texts.items():
        docs_file = out / f"{lang}.{split}.jsonl"
        atomic_write_text(docs_file, "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs))
        task = {
            "task": task_name(lang),
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(docs_file.resolve())}},
            "test_split": split,
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "{{text}}",
            # Aggregations (weighted perplexity, bits per byte over bytes) are the harness's defaults for these.
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0, "source": str(Path(data).resolve()), "split": split},
        }
        atomic_write_text(out / f"{task_name(lang)}.yaml", yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
        names.append(task_name(lang))
    group = {"group": GROUP, "task": names, "metadata": {"version": 1.0}}
    atomic_write_text(out / f"{GROUP}.yaml", yaml.safe_dump(group, sort_keys=False))
    return [*names, GROUP]


def command(model: Path, tasks_dir: Path, device: str = "cpu") -> str:
    """The lm_eval command line that runs the written tasks on `model`."""
    return (
        f"lm_eval --model hf --model_args pretrained={model},trust_remote_code=True --include_path {tasks_dir} "
        f"--tasks {GROUP} --device {device} --batch_size 8"
    )
