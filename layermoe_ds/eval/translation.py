"""FLORES translation, the paper's protocol: each language to and from English, `shots` examples drawn once (seeded)
from the dev split as the prompt's prefix, beam search (6 beams), the first line generated taken as the
translation, chrF (sacrebleu) on the devtest split; COMET where a local checkpoint is given.

The prompt per direction is `Translation: <Source>: <source sentence> <Target>: <target sentence>` per line, the shots
first and the test sentence last with its target left empty. A prompt that would not leave `max_new_tokens` within
the model's context is built with fewer shots (the last ones dropped first) and counted under `shots_lowered`: never
cut silently.

The data is a FLORES directory as released: `dev/` and `devtest/`, one sentence per line in a file per language,
named by its FLORES-200 code (`flores200_dataset`: `dev/ell_Grek.dev`) or its FLORES-101 code (`flores101_dataset`:
`dev/ell.dev`, `dev/zho_simpl.dev`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.errors import InputError, MissingInputError
from layermoe_ds.languages import FLORES, FLORES_CODE

log = logging.getLogger(__name__)

TEMPLATE = "Translation: {src_name}: {src} {tgt_name}: {tgt}"
PIVOT = "en"
# FLORES-101 file codes where they are not FLORES-200's three letters.
FLORES101_CODES = {"zh": "zho_simpl", "ar": "ara", "fa": "fas", "az": "aze", "lv": "lav", "mn": "mon", "ms": "msa",
                   "et": "est", "uz": "uzb", "sq": "sqi", "ps": "pus", "sw": "swh", "ne": "npi"}  # fmt: skip
NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "bg": "Bulgarian",
    "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "gl": "Galician", "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean", "ky": "Kyrgyz",
    "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian",
    "mr": "Marathi", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "nb": "Norwegian", "ne": "Nepali",
    "nl": "Dutch", "or": "Odia", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "so": "Somali",
    "sq": "Albanian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik",
    "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek",
    "vi": "Vietnamese", "xh": "Xhosa", "yo": "Yoruba", "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip


@dataclass(frozen=True)
class Direction:
    src: str
    tgt: str

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"

    @property
    def language(self) -> str:
        """The language other than the pivot, whose scores these are."""
        return self.tgt if self.src == PIVOT else self.src

    @property
    def benchmark(self) -> str:
        return "flores_from_en" if self.src == PIVOT else "flores_to_en"


def directions(langs: Sequence[str], pivot: str = PIVOT) -> list[Direction]:
    """The paper's pairs: every language other than the pivot, to it and from it."""
    pairs = []
    for lang in langs:
        if lang != pivot:
            pairs += [Direction(pivot, lang), Direction(lang, pivot)]
    return pairs


def file_candidates(lang: str, split: str) -> list[str]:
    """File names a language's split may have in a FLORES directory: FLORES-200's code, then FLORES-101's."""
    if FLORES_CODE.match(lang):
        return [f"{lang}.{split}"]
    code200 = FLORES.get(lang)
    if code200 is None:
        return []
    return [f"{code200}.{split}", f"{FLORES101_CODES.get(lang, code200.split('_')[0])}.{split}"]


def read_split(root: Path, lang: str, split: str) -> list[str]:
    """One language's sentences of `split` (dev or devtest); a missing file is one line naming what was looked for."""
    names = file_candidates(lang, split)
    for name in names:
        path = root / split / name
        if path.is_file():
            return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    looked = ", ".join(str(root / split / n) for n in names) or f"(no FLORES code known for {lang!r})"
    raise MissingInputError(f"benchmark --flores: no {split} file for {lang!r}: looked for {looked}")


def language_name(lang: str) -> str:
    return NAMES.get(lang, lang)


def prompt(direction: Direction, shots: list[tuple[str, str]], source: str) -> str:
    names = {"src_name": language_name(direction.src), "tgt_name": language_name(direction.tgt)}
    lines = [TEMPLATE.format(src=s, tgt=t, **names) for s, t in shots]
    return "\n".join([*lines, TEMPLATE.format(src=source, tgt="", **names).rstrip() + " "])


def first_line(generated: str) -> str:
    """The translation: the generated text up to its first newline (the model goes on with another example)."""
    return generated.split("\n", 1)[0].strip()


@dataclass
class Translator:
    """Beam-search generation of prompts on one model, fitting each prompt and its new tokens in the context."""

    model: object
    tokenizer: object
    context: int
    beams: int = 6
    max_new_tokens: int = 256
    batch_size: int = 1

    def fit(self, direction: Direction, shots: list[tuple[str, str]], source: str) -> tuple[str, int]:
        """The prompt with as many of `shots` as fit (the last dropped first), and how many that is."""
        for n in range(len(shots), -1, -1):
            text = prompt(direction, shots[:n], source)
            if len(self.tokenizer(text)["input_ids"]) + self.max_new_tokens <= self.context:
                return text, n
        raise InputError(
            f"benchmark --flores: a {direction.name} sentence alone leaves no room for {self.max_new_tokens} new "
            f"tokens in the model's {self.context}-token context; lower --flores-max-new-tokens"
        )

    def translate(self, prompts: list[str]) -> list[str]:
        import torch

        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        out = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = self.tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True)
                batch = batch.to(next(self.model.parameters()).device)
                with torch.inference_mode():
                    ids = self.model.generate(
                        **batch,
                        num_beams=self.beams,
                        do_sample=False,
                        early_stopping=True,
                        max_new_tokens=self.max_new_tokens,
                        stop_strings=["\n"],
                        tokenizer=self.tokenizer,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new = ids[:, batch["input_ids"].shape[1] :]
                out += [first_line(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.tokenizer.padding_side = side
        return out


def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def comet_score(checkpoint: Path, rows: list[dict], batch_size: int) -> float:
    """COMET's system score × 100 (as the paper reports it) from a local checkpoint (e.g. wmt22-comet-da's
    `checkpoints/model.ckpt`); needs `pip install unbabel-comet`."""
    try:
        from comet import load_from_checkpoint
    except ImportError as exc:
        raise InputError(
            f"benchmark --comet: the COMET package is not installed ({exc}); pip install unbabel-comet"
        ) from None
    import torch

    model = load_from_checkpoint(str(checkpoint))
    prediction = model.predict(rows, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0)
    return 100 * float(prediction["system_score"])


def run_flores(
    translator: Translator,
    root: Path,
    langs: Sequence[str],
    out: Path,
    shots: int = 8,
    limit: int | None = None,
    seed: int = 42,
    comet: Path | None = None,
    pivot: str = PIVOT,
) -> dict[str, dict]:
    """direction → {"chrf", "comet"?, "sentences", "num_fewshot", "shots_lowered"}; each direction's source,
    translation and reference in OUT/flores/<src>-<tgt>.jsonl."""
    from layermoe_ds.io import atomic_write_text

    results = {}
    picked: list[int] | None = None  # the same dev lines for every direction, as the reference draws them once
    for direction in directions(langs, pivot):
        dev_src, dev_tgt = read_split(root, direction.src, "dev"), read_split(root, direction.tgt, "dev")
        test_src, test_tgt = read_split(root, direction.src, "devtest"), read_split(root, direction.tgt, "devtest")
        for name, (a, b) in {"dev": (dev_src, dev_tgt), "devtest": (test_src, test_tgt)}.items():
            if len(a) != len(b):
                raise InputError(f"benchmark --flores: {direction.name} {name} has {len(a)} vs {len(b)} sentences")
        if picked is None:
            if shots > len(dev_src):
                raise InputError(f"benchmark --flores-shots: {shots} is more than the {len(dev_src)} dev sentences")
            picked = random.Random(seed).sample(range(len(dev_src)), shots)
        examples = [(dev_src[i], dev_tgt[i]) for i in picked]
        n = len(test_src) if limit is None else min(limit, len(test_src))
        fitted = [translator.fit(direction, examples, source) for source in test_src[:n]]
        hypotheses = translator.translate([text for text, _ in fitted])
        lowered = sum(used < shots for _, used in fitted)
        if lowered:
            log.warning("%s: %d prompts built with fewer than %d shots to fit the context", direction.name, lowered,
                        shots)  # fmt: skip
        rows = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(test_src, hypotheses, test_tgt[:n], strict=False)]
        atomic_write_text(
            Path(out) / "flores" / f"{direction.name}.jsonl",
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        )
        entry = {"chrf": chrf(hypotheses, test_tgt[:n]), "sentences": n, "num_fewshot": shots}
        entry["shots_lowered"] = lowered
        if comet is not None:
            entry["comet"] = comet_score(comet, rows, translator.batch_size)
        results[direction.name] = entry
        log.info("flores %s: chrF %.2f over %d sentences", direction.name, entry["chrf"], n)
    return results
