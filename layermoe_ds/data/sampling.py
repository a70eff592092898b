"""Which documents `data tokenize` takes, decided by each document's text alone, so the choice is the same on every
run and every worker count: per-language budgets (`--max-docs-per-lang`, `--max-tokens-per-lang`) keep the
documents with the smallest seeded hash, not the first N; a language whose text names no held-out split gets
`valid` and `test` carved from it by another hash (`--holdout-fraction` each).

A budget needs one pass that hashes the language's training documents first (bounded memory: the hashes of the
documents that may be kept). `--max-tokens-per-lang` is met through the documents' bytes and the tokenizer's bytes
per token for that language, measured on a hash-chosen sample of its documents: the tokens kept land near the budget,
and the manifest records how many it took."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from layermoe_ds.errors import InputError

SAMPLE_KEY = b"layermoe-sample"
HOLDOUT_KEY = b"layermoe-holdout"
RATIO_SAMPLE_BYTES = 2 << 20  # text per language tokenized to measure its bytes per token
MAX_BYTES_PER_TOKEN = 8.0  # above any tokenizer's on natural text: bounds what the first pass must keep


def doc_hash(text: str, seed: int, key: bytes = SAMPLE_KEY) -> int:
    """A 64-bit hash of the document's text under `seed`."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def parse_budget(text: str | None, what: str) -> dict[str, int] | int | None:
    """`1000` (every language) or `el=1000,ru=5000` (those languages) → int or {lang: int}; None → None."""
    if text is None:
        return None
    text = text.strip()
    try:
        if "=" not in text:
            value = int(text)
            if value < 1:
                raise ValueError
            return value
        budget = {}
        for pair in text.split(","):
            lang, _, value = pair.partition("=")
            budget[lang.strip()] = int(value)
            if budget[lang.strip()] < 1 or not lang.strip():
                raise ValueError
        return budget
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a positive count or LANG=COUNT pairs like el=1000,ru=5000") from None


@dataclass(frozen=True)
class Budget:
    """One language's cap: documents or tokens."""

    documents: int | None = None
    tokens: int | None = None


def budgets_for(langs, max_docs, max_tokens) -> dict[str, Budget]:
    """language → Budget from the parsed options (a language named in neither has none)."""
    if max_docs is not None and max_tokens is not None:
        raise InputError("data tokenize: give --max-docs-per-lang or --max-tokens-per-lang, not both")
    out = {}
    for option, kind in ((max_docs, "documents"), (max_tokens, "tokens")):
        if option is None:
            continue
        if isinstance(option, dict):
            unknown = sorted(set(option) - set(langs))
            if unknown:
                raise InputError(f"--max-{kind[:-1] if kind == 'documents' else kind}: languages {unknown} are not in "
                                 f"the data; found: {sorted(langs)}")  # fmt: skip
            out.update({lang: Budget(**{kind: value}) for lang, value in option.items()})
        else:
            out.update({lang: Budget(**{kind: option}) for lang in langs})
    return out


@dataclass
class Candidates:
    """The first pass's running selection for one language: (hash, bytes, tokens or −1) of the documents with the
    smallest hashes that the budget may still need."""

    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seen: int = 0

    def add(self, hashes, nbytes, tokens, keep: int | None, keep_bytes: int | None) -> None:
        """Merge a chunk's documents; keep the `keep` smallest hashes, or the smallest whose bytes reach
        `keep_bytes`."""
        self.seen += len(hashes)
        h = np.concatenate([self.hashes, np.asarray(hashes, np.uint64)])
        b = np.concatenate([self.nbytes, np.asarray(nbytes, np.int64)])
        t = np.concatenate([self.tokens, np.asarray(tokens, np.int64)])
        order = np.argsort(h, kind="stable")
        h, b, t = h[order], b[order], t[order]
        if keep is not None:
            h, b, t = h[:keep], b[:keep], t[:keep]
        elif keep_bytes is not None:
            cut = int(np.searchsorted(np.cumsum(b), keep_bytes)) + 1
            h, b, t = h[:cut], b[:cut], t[:cut]
        self.hashes, self.nbytes, self.tokens = h, b, t


def cut_for(candidates: Candidates, budget: Budget) -> dict:
    """The largest hash kept for `budget` (documents with a hash ≤ it are taken) and what it takes."""
    if not len(candidates.hashes):
        return {"threshold": None, "documents": 0, "seen": candidates.seen}
    if budget.documents is not None:
        n = min(budget.documents, len(candidates.hashes))
        return {"threshold": int(candidates.hashes[n - 1]), "documents": n, "seen": candidates.seen}
    measured = candidates.tokens >= 0
    ratio = float(candidates.nbytes[measured].sum()) / max(int(candidates.tokens[measured].sum()), 1)
    estimate = np.where(measured, candidates.tokens, candidates.nbytes / ratio)
    n = min(int(np.searchsorted(np.cumsum(estimate), budget.tokens)) + 1, len(candidates.hashes))
    return {
        "threshold": int(candidates.hashes[n - 1]),
        "documents": n,
        "seen": candidates.seen,
        "bytes_per_token": round(ratio, 4),
        "tokens_estimate": int(round(float(estimate[:n].sum()))),
    }


def holdout_split(text: str, seed: int, fraction: float) -> str:
    """train, valid or test for a document of a language with no held-out text: `fraction` each by a hash."""
    u = doc_hash(text, seed, HOLDOUT_KEY) / 2.0**64
    return "test" if u < fraction else ("valid" if u < 2 * fraction else "train")
