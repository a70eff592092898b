"""Local lm-evaluation-harness tasks over held-out text (the optional `[eval]` extra).

Hub datasets are out of reach on an offline cluster, so `layermoe lm-eval-tasks` writes one perplexity task per
language (`loglikelihood_rolling`: word/byte perplexity and bits per byte) over local files, and a group that runs
them all. The text goes through the same loader as training and `layermoe evaluate` (every supported data layout,
the same errors; a prepared directory is decoded), and is copied next to the task files as
`<lang>.<split>.jsonl`, so the task directory needs nothing else (its YAML files name the copies by absolute path:
write it where it will be used). Any model lm-eval can load then runs on them, a LayerMoE export included:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path TASKS --tasks layermoe_heldout
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from layermoe_ds.data.loading import iter_documents, raw_sources
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.data.tokens import PreparedData, document_bos, is_prepared
from layermoe_ds.errors import InputError
from layermoe_ds.io import atomic_output, atomic_write_text

GROUP = "layermoe_heldout"


def task_name(lang: str) -> str:
    return f"{GROUP}_{lang}"


def prepared_documents(data: Path, lang: str, split: str, tokenizer_dir: Path | None = None) -> Iterator[str]:
    """The documents of a prepared directory, decoded from their tokens by the tokenizer that made them (the
    manifest's, or `tokenizer_dir`); a document that does not decode to its recorded UTF-8 length is an error
    (that tokenizer is not lossless: give the raw text instead)."""
    prepared = PreparedData(data)
    tokenizer_dir = Path(tokenizer_dir or prepared.manifest["tokenizer"]["name"])
    tokenizer = load_tokenizer(tokenizer_dir)
    prepared.check_tokenizer(tokenizer, str(tokenizer_dir))
    found = prepared.languages()
    if lang not in found:
        raise InputError(f"languages [{lang!r}] not found in {data}; found: {sorted(found)}")
    stream = prepared.stream(lang, split)
    lengths, nbytes = stream.document_lengths()
    skip = 0 if document_bos(tokenizer) is None else 1  # the BOS each document starts with is no text
    start = 0
    for length, size in zip(lengths.tolist(), nbytes.tolist(), strict=True):
        text = tokenizer.decode(stream.read(start + skip, start + length - 1).tolist())
        if len(text.encode("utf-8")) != size:
            raise InputError(
                f"{data}: document at token {start} of {lang}/{split} decodes to {len(text.encode('utf-8'))} bytes, "
                f"not its {size}: {tokenizer_dir} does not decode losslessly; give the raw text as --data"
            )
        start += length
        yield text


def write_tasks(
    data: Path, langs: Sequence[str], out: Path, split: str = "test", tokenizer: Path | None = None
) -> list[str]:
    """Write the per-language tasks and their group into `out`; returns the task names (the group last).

    Raw text is streamed document by document; a prepared directory is decoded (`prepared_documents`)."""
    data, out = Path(data), Path(out)
    prepared = is_prepared(data)
    if not prepared:
        raw_sources(data, list(langs), [split])  # languages, split files: checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for lang in langs:
        docs_file = out / f"{lang}.{split}.jsonl"
        docs = prepared_documents(data, lang, split, tokenizer) if prepared else iter_documents(data, lang, split)
        count = 0
        with atomic_output(docs_file) as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            docs_file.unlink()
            raise InputError(f"data: language {lang!r} has no text in its {split} split ({data})")
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
