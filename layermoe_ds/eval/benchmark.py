"""`layermoe benchmark`: the paper's multilingual benchmarks per language through lm-evaluation-harness (the
optional `[eval]` extra), averaged over the old and the new languages as the paper reports them.

The paper suite (the reference's lm-eval protocol): ARC-Challenge 25-shot (`arc_challenge`, `arc_<lang>`),
HellaSwag 10-shot (`hellaswag`, `hellaswag_<lang>`), MMLU 5-shot (`mmlu`, `cmmlu` for zh, `m_mmlu_<lang>`; `mmlu_el`
and `mmlu_tr` at 4 shots where a task of that name is given with --include-path) and Belebele 5-shot
(`belebele_<FLORES-200 code>`). A language with no task for a benchmark is listed under `missing`, never dropped.
`--tasks` adds any lm-eval task per language (`my_mc_{lang}`, `my_mc_{lang}:3` for 3 shots).

Offline clusters: `--datasets DIR` reads each task's dataset from `DIR/<hub repository>` (what `hf download REPO
--repo-type dataset --local-dir DIR/REPO` writes), checked for every task before the model is loaded. Without it,
where the Hub cannot be reached, that is one line before the model is loaded too.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.eval.task_data import check_datasets, check_hub_reachable, local_datasets
from layermoe_ds.languages import FLORES, FLORES_CODE
from layermoe_ds.settings import BenchmarkSettings, path_or_none

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    name: str
    metric: str  # what the paper's tables report
    shots: int

    def candidates(self, lang: str) -> list[tuple[str, int]]:
        """(task, shots) in order of preference for `lang`: the first that lm-eval knows is run."""
        if self.name == "arc":
            return [("arc_challenge" if lang == "en" else f"arc_{lang}", self.shots)]
        if self.name == "hellaswag":
            return [("hellaswag" if lang == "en" else f"hellaswag_{lang}", self.shots)]
        if self.name == "mmlu":
            special = {"en": ("mmlu", 5), "zh": ("cmmlu", 5), "tr": ("mmlu_tr", 4), "el": ("mmlu_el", 5)}
            return [special[lang]] if lang in special else [(f"m_mmlu_{lang}", self.shots)]
        if self.name == "belebele":
            code = lang if FLORES_CODE.match(lang) else FLORES.get(lang)
            return [(f"belebele_{code}", self.shots)] if code else []
        raise AssertionError(self.name)


PAPER = (Benchmark("arc", "acc_norm", 25), Benchmark("hellaswag", "acc_norm", 10), Benchmark("mmlu", "acc", 5),
         Benchmark("belebele", "acc", 5))  # fmt: skip
SUITES = {"paper": PAPER, "none": ()}
CUSTOM_METRICS = ("acc", "acc_norm", "exact_match", "chrf", "bleu", "f1", "word_perplexity")


@dataclass(frozen=True)
class FloresOptions:
    """FLORES translation (eval/translation.py): the dataset directory and the paper's protocol settings."""

    root: Path
    shots: int = 8
    beams: int = 6
    max_new_tokens: int = 256
    comet: Path | None = None  # a local COMET checkpoint: COMET beside chrF


@dataclass(frozen=True)
class PlannedTask:
    lang: str
    benchmark: str
    task: str
    shots: int
    metric: str | None  # None: the first of CUSTOM_METRICS the task reports


def custom_tasks(specs: Sequence[str]) -> list[tuple[str, int | None]]:
    """`--tasks` entries: `name_{lang}` or `name_{lang}:shots`."""
    tasks = []
    for spec in specs:
        name, _, shots = spec.partition(":")
        if "{lang}" not in name:
            raise InputError(
                f"benchmark --tasks: {spec!r} has no {{lang}} (e.g. my_mc_{{lang}}): tasks run per language"
            )
        if shots and not shots.isdigit():
            raise InputError(f"benchmark --tasks: {spec!r}: the shot count after ':' must be a whole number")
        tasks.append((name, int(shots) if shots else None))
    return tasks


def plan(
    langs: Sequence[str], suite: str, tasks: Sequence[str], known: set[str]
) -> tuple[list[PlannedTask], dict[str, list[dict]]]:
    """(what runs, language → the benchmarks it lacks with the task names looked for)."""
    if suite not in SUITES:
        raise InputError(f"benchmark --suite: {suite!r} is not one of {sorted(SUITES)}")
    planned, missing = [], {}
    for lang in langs:
        for benchmark in SUITES[suite]:
            candidates = benchmark.candidates(lang)
            found = next(((task, shots) for task, shots in candidates if task in known), None)
            if found is None:
                looked_for = [task for task, _ in candidates] or [f"(no FLORES-200 code known for {lang!r})"]
                missing.setdefault(lang, []).append({"benchmark": benchmark.name, "looked_for": looked_for})
            else:
                planned.append(PlannedTask(lang, benchmark.name, *found, benchmark.metric))
        for template, shots in custom_tasks(tasks):
            task = template.replace("{lang}", lang)
            if task in known:
                planned.append(PlannedTask(lang, template, task, 0 if shots is None else shots, None))
            else:
                missing.setdefault(lang, []).append({"benchmark": template, "looked_for": [task]})
    return planned, missing


def task_score(results: dict, task: str, metric: str | None) -> tuple[str, float] | None:
    """(metric, value) of a task or group in lm-eval's results; `metric` None: the first of CUSTOM_METRICS."""
    row = results.get("groups", {}).get(task) or results.get("results", {}).get(task) or {}
    for name in [metric] if metric else CUSTOM_METRICS:
        for key, value in row.items():
            if key.split(",")[0] == name and isinstance(value, int | float) and not math.isnan(value):
                return name, float(value)
    return None


def over_context(samples: dict, encode, max_length: int) -> dict[str, int]:
    """task → how many documents had a request longer than the model's context (lm-eval cuts those from the left,
    with a warning only)."""
    counts = {}
    for task, docs in samples.items():
        over = 0
        for doc in docs:
            lengths = [sum(len(encode(part)) for part in arg if isinstance(part, str)) for arg in doc["arguments"]]
            over += any(length > max_length for length in lengths)
        if over:
            counts[task] = over
    return counts


def benchmark_averages(scores: dict[str, dict[str, dict]], langs: Sequence[str]) -> dict[str, float]:
    """Per benchmark, the mean over `langs` that have a score; `all`: the mean of those benchmark means, translation
    (chrF/COMET on a 0-100 scale, reported beside) left out."""
    benchmarks = sorted({bench for lang in langs for bench in scores.get(lang, {})})
    averages = {}
    for bench in benchmarks:
        values = [scores[lang][bench]["value"] for lang in langs if bench in scores.get(lang, {})]
        averages[bench] = sum(values) / len(values)
    choice = [value for bench, value in averages.items() if not bench.startswith("flores")]
    if choice:
        averages["all"] = sum(choice) / len(choice)
    return averages


def markdown(report: dict) -> str:
    """The scores as a table: a row per language (old first), a column per benchmark, Old/New averages below."""
    benches = sorted({bench for row in report["scores"].values() for bench in row})
    lines = ["| language | group | " + " | ".join(benches) + " |", "|---|---|" + "---:|" * len(benches)]
    for lang in [*report["old"], *report["new"]]:
        group = "old" if lang in report["old"] else "new"
        row = report["scores"].get(lang, {})
        cells = [f"{row[bench]['value']:.4f}" if bench in row else "—" for bench in benches]
        lines.append(f"| {lang} | {group} | " + " | ".join(cells) + " |")
    for name in ("old_avg", "new_avg"):
        cells = [f"{report[name][b]:.4f}" if b in report[name] else "—" for b in benches]
        lines.append(f"| **{name}** | | " + " | ".join(cells) + " |")
    if report["missing"]:
        lines += ["", "Missing (no task found):"]
        for lang, rows in report["missing"].items():
            lines.append(f"- {lang}: " + "; ".join(f"{r['benchmark']} ({', '.join(r['looked_for'])})" for r in rows))
    lowered = {d: row["shots_lowered"] for d, row in report.get("flores", {}).items() if row["shots_lowered"]}
    if lowered:
        counts = ", ".join(f"{d} {n}" for d, n in lowered.items())
        context = report["max_length"]
        lines += ["", f"FLORES prompts built with fewer shots to fit the {context}-token context: {counts}"]
    if report.get("over_context"):
        counts = ", ".join(f"{task} {n}" for task, n in report["over_context"].items())
        lines += ["", f"Longer than the {report['max_length']}-token context (lm-eval cuts from the left): {counts}"]
    return "\n".join(lines) + "\n"


@functools.cache
def task_manager(include_path: str | None):
    """lm-eval's index of every task (its own and `include_path`'s): built once a process (it reads ~10,000 YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """Plan, check, run and write `OUT/results.json` and `OUT/results.md`; returns the report."""
    from layermoe_ds.eval import translation
    from layermoe_ds.io import atomic_write_text, write_json

    s = settings
    model_dir, old, new, out, suite, tasks, limit = (
        Path(s.model),
        s.old,
        s.new,
        Path(s.out),
        str(s.suite),
        s.tasks,
        s.limit,
    )
    include_path, datasets = path_or_none(s.include_path), path_or_none(s.datasets)
    flores = None
    if s.flores:
        flores = FloresOptions(Path(s.flores), s.flores_shots, s.beams, s.flores_max_new_tokens, path_or_none(s.comet))
    if include_path is not None and not Path(include_path).is_dir():
        raise MissingInputError(f"benchmark --include-path: {include_path} is not a directory")
    manager = task_manager(str(include_path) if include_path else None)
    planned, missing = plan([*old, *new], suite, tasks, set(manager.all_tasks))
    report: dict = {"model": str(model_dir), "suite": suite, "old": list(old), "new": list(new), "limit": limit}
    report["plan"] = {}
    for item in planned:
        entry = {"benchmark": item.benchmark, "task": item.task, "num_fewshot": item.shots}
        report["plan"].setdefault(item.lang, []).append(entry)
    pairs = translation.directions([*old, *new])
    for pair in pairs:
        if flores is None:
            if suite == "paper" and pair.src == translation.PIVOT:
                looked_for = ["--flores DIR (the FLORES-101/200 dev and devtest files)"]
                missing.setdefault(pair.language, []).append({"benchmark": "flores", "looked_for": looked_for})
            continue
        entry = {"benchmark": pair.benchmark, "task": pair.name, "num_fewshot": flores.shots}
        report["plan"].setdefault(pair.language, []).append(entry)
    report["missing"] = missing
    for lang, rows in missing.items():
        log.warning(
            "%s: no task for %s", lang, ", ".join(f"{r['benchmark']} ({'/'.join(r['looked_for'])})" for r in rows)
        )
    if s.dry_run:
        write_json(out / "results.json", report)
        return report
    if not planned and not (flores and pairs):
        raise InputError("benchmark: no task to run for these languages (see `missing` with --dry-run)")
    if flores is not None:  # every file there before the model is loaded
        for lang in {lang for pair in pairs for lang in (pair.src, pair.tgt)}:
            for split in ("dev", "devtest"):
                translation.read_split(Path(flores.root), lang, split)
        if flores.comet is not None and not Path(flores.comet).is_file():
            raise MissingInputError(f"benchmark --comet: {flores.comet} is not a file (a COMET checkpoint, model.ckpt)")
    if datasets is not None:
        check_datasets(manager.task_index, sorted({item.task for item in planned}), Path(datasets))
    else:
        check_hub_reachable(manager.task_index, sorted({item.task for item in planned}))
    lm = _harness_model(model_dir, s.batch_size, s.device or None, str(s.dtype))
    scores: dict[str, dict[str, dict]] = {}
    over: dict[str, int] = {}
    with local_datasets(datasets):
        for shots in sorted({item.shots for item in planned}):
            group = [item for item in planned if item.shots == shots]
            results = _evaluate(lm, sorted({item.task for item in group}), shots, limit, manager)
            for item in group:
                found = task_score(results, item.task, item.metric)
                if found is None:
                    raise InputError(f"benchmark: task {item.task} reported no {item.metric or CUSTOM_METRICS} metric")
                metric, value = found
                entry = {"metric": metric, "value": value, "task": item.task, "num_fewshot": shots}
                scores.setdefault(item.lang, {})[item.benchmark] = entry
            over |= over_context(results.get("samples", {}), lm.tok_encode, lm.max_length)
    if flores is not None:
        translator = translation.Translator(lm.model, lm.tokenizer, lm.max_length, flores.beams, flores.max_new_tokens,
                                            s.batch_size)  # fmt: skip
        translated = translation.run_flores(translator, Path(flores.root), [*old, *new], out, flores.shots, limit,
                                            comet=flores.comet)  # fmt: skip
        report["flores"] = translated
        for pair in pairs:
            row = translated[pair.name]
            for metric in ("chrf", "comet"):
                if metric in row:
                    name = pair.benchmark + ("" if metric == "chrf" else " (COMET)")
                    entry = {"metric": metric, "value": row[metric], "task": pair.name, "num_fewshot": flores.shots}
                    scores.setdefault(pair.language, {})[name] = entry
    report |= {"scores": scores, "old_avg": benchmark_averages(scores, old), "new_avg": benchmark_averages(scores, new)}
    report |= {"max_length": lm.max_length, "over_context": over}
    for task, count in over.items():
        log.warning(
            "%s: %d documents have a prompt longer than the model's %d-token context (lm-eval cuts them from the left)",
            task,
            count,
            lm.max_length,
        )
    write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown(report))
    return report


def _harness_model(model_dir: Path, batch_size: int, device: str | None, dtype: str):
    """lm-eval's Hugging Face model around the model as layermoe_ds loads it (a LayerMoE directory through the
    package's classes, its weights checked) and its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.distributed import device_and_backend
    from layermoe_ds.hf.load import load_causal_lm, parse_dtype

    device = device_and_backend(device)[0]
    model = load_causal_lm(model_dir, parse_dtype(dtype), device)
    return HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir), batch_size=batch_size, device=str(device))


def _evaluate(lm, tasks: list[str], shots: int, limit: int | None, manager) -> dict:
    from lm_eval import simple_evaluate

    log.info("lm-eval: %s at %d shots%s", ", ".join(tasks), shots, f", {limit} documents each" if limit else "")
    return simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=manager, log_samples=True, bootstrap_iters=0
    )
