"""Local snapshots of the paper's benchmark datasets, in each hub repository's schema and layout (a README whose
`configs` name each configuration's files), as `hf download REPO --repo-type dataset --local-dir DIR/REPO` leaves
them: what `layermoe benchmark --datasets DIR` reads on an offline cluster. A few made-up documents each."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "river stone light garden window paper music winter bread silver morning answer".split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _write_repo(root: Path, repo: str, configs: dict[str, dict[str, list[dict]]]) -> None:
    """`root/repo`: README.md front matter listing each config's split files, and the files as JSON lines."""
    base = root / repo
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = Path(config) / f"{split}.jsonl"
            (base / path).parent.mkdir(parents=True, exist_ok=True)
            (base / path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            lines += [f"  - split: {split}", f"    path: {path}"]
    (base / "README.md").write_text("\n".join([*lines, "---", ""]))


def _rows(make, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make(rng, i) for i in range(n)]


def arc_en(rng, i):
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"q{i}",
        "question": _sentence(rng) + "?",
        "choices": {"text": [_sentence(rng, 2) for _ in labels], "label": labels},
        "answerKey": rng.choice(labels),
    }


def okapi_mc(rng, i, options: str = "abcde"):
    row = {"id": f"q{i}", "instruction": _sentence(rng) + "?", "answer": rng.choice("ABCD")}
    return row | {f"option_{o}": _sentence(rng, 2) for o in options}


def hellaswag(rng, i):
    return {
        "ind": i,
        "activity_label": rng.choice(WORDS),
        "ctx_a": _sentence(rng),
        "ctx_b": _sentence(rng, 3).lower(),
        "ctx": "",
        "endings": [_sentence(rng, 3) for _ in range(4)],
        "label": str(rng.randrange(4)),
        "split": "val",
        "split_type": "indomain",
        "source_id": f"s{i}",
    }


def mmlu(rng, i):
    return {"question": _sentence(rng) + "?", "choices": [_sentence(rng, 2) for _ in range(4)], "answer": i % 4}


def belebele(rng, i):
    row = {"flores_passage": _sentence(rng, 12), "question": _sentence(rng) + "?", "correct_answer_num": str(i % 4 + 1)}
    return row | {f"mc_answer{k}": _sentence(rng, 2) for k in range(1, 5)}


def write_snapshots(root: Path, mmlu_subjects: list[str], okapi_langs: list[str], flores: list[str]) -> Path:
    """The English tasks (ARC-Challenge, HellaSwag, MMLU with every subject), the okapi translations (m_arc,
    m_hellaswag, m_mmlu) of `okapi_langs`, and Belebele in the `flores` codes."""
    n = 30  # enough for the paper's shot counts: 25 from ARC's train split
    splits3 = lambda make, seed: {s: _rows(make, n, seed + k) for k, s in enumerate(("train", "validation", "test"))}  # noqa: E731
    _write_repo(root, "allenai/ai2_arc", {"ARC-Challenge": splits3(arc_en, 1)})
    _write_repo(
        root, "Rowan/hellaswag", {"default": {"train": _rows(hellaswag, n, 2), "validation": _rows(hellaswag, n, 3)}}
    )
    _write_repo(root, "cais/mmlu", {s: {"dev": _rows(mmlu, 5, 4), "test": _rows(mmlu, n, 5)} for s in mmlu_subjects})
    _write_repo(root, "alexandrainst/m_arc", {lang: splits3(okapi_mc, 6) for lang in okapi_langs})
    _write_repo(root, "alexandrainst/m_hellaswag", {lang: {"val": _rows(hellaswag, n, 9)} for lang in okapi_langs})
    mc4 = lambda rng, i: okapi_mc(rng, i, "abcd")  # noqa: E731
    _write_repo(
        root,
        "alexandrainst/m_mmlu",
        {lang: {"train": _rows(mc4, 5, 10), "test": _rows(mc4, n, 11)} for lang in okapi_langs},
    )
    _write_repo(root, "facebook/belebele", {code: {"test": _rows(belebele, n, 12)} for code in flores})
    return root
