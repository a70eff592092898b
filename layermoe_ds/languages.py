"""Language codes: the short codes the project names languages by (ISO 639-1: `el`), FLORES-200's (`ell_Grek`: the
Belebele tasks, FineWeb-2's and HPLT's folders), and the user's own mapping for the rest."""

from __future__ import annotations

import json
import re
from pathlib import Path

from layermoe_ds.errors import InputError

# ISO 639-1 → FLORES-200 (Belebele's language codes); a FLORES code given as a language is taken as it is.
FLORES = {
    "af": "afr_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "as": "asm_Beng", "az": "azj_Latn", "bg": "bul_Cyrl",
    "bn": "ben_Beng", "ca": "cat_Latn", "cs": "ces_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek",
    "en": "eng_Latn", "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab", "fi": "fin_Latn",
    "fr": "fra_Latn", "gl": "glg_Latn", "gu": "guj_Gujr", "ha": "hau_Latn", "he": "heb_Hebr", "hi": "hin_Deva",
    "hr": "hrv_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn", "ig": "ibo_Latn", "is": "isl_Latn",
    "it": "ita_Latn", "ja": "jpn_Jpan", "ka": "kat_Geor", "kk": "kaz_Cyrl", "km": "khm_Khmr", "kn": "kan_Knda",
    "ko": "kor_Hang", "ky": "kir_Cyrl", "lo": "lao_Laoo", "lt": "lit_Latn", "lv": "lvs_Latn", "mk": "mkd_Cyrl",
    "ml": "mal_Mlym", "mn": "khk_Cyrl", "mr": "mar_Deva", "ms": "zsm_Latn", "mt": "mlt_Latn", "my": "mya_Mymr",
    "nb": "nob_Latn", "ne": "npi_Deva", "nl": "nld_Latn", "or": "ory_Orya", "pa": "pan_Guru", "pl": "pol_Latn",
    "ps": "pbt_Arab", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "si": "sin_Sinh", "sk": "slk_Latn",
    "sl": "slv_Latn", "so": "som_Latn", "sq": "als_Latn", "sr": "srp_Cyrl", "sv": "swe_Latn", "sw": "swh_Latn",
    "ta": "tam_Taml", "te": "tel_Telu", "tg": "tgk_Cyrl", "th": "tha_Thai", "tl": "tgl_Latn", "tr": "tur_Latn",
    "uk": "ukr_Cyrl", "ur": "urd_Arab", "uz": "uzn_Latn", "vi": "vie_Latn", "xh": "xho_Latn", "yo": "yor_Latn",
    "zh": "zho_Hans", "zu": "zul_Latn",
}  # fmt: skip
FLORES_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")

SHORT = {code: short for short, code in FLORES.items()}  # FLORES-200 → the short code


def parse_lang_map(text: str | None) -> dict[str, str]:
    """`ekk_Latn=et,zsm_Latn=ms` → {"ekk_Latn": "et", "zsm_Latn": "ms"} (`--lang-map`); None or "" → {}."""
    mapping = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        code, sep, short = pair.partition("=")
        if not sep or not code.strip() or not short.strip():
            raise InputError(f"--lang-map: {pair!r} is not CODE=LANG (e.g. ekk_Latn=et)")
        mapping[code.strip()] = short.strip()
    return mapping


def read_lang_map(text: str | None) -> dict[str, str]:
    """`--lang-map`: CODE=LANG pairs, or a JSON file holding an object of them."""
    if text and Path(text).is_file():
        try:
            mapping = json.loads(Path(text).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"--lang-map: {text} is not valid JSON ({exc})") from exc
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise InputError(f"--lang-map: {text} must hold a JSON object of code → language strings")
        return mapping
    return parse_lang_map(text)


def canonical(code: str, lang_map: dict[str, str]) -> str:
    """The project's code for a language code found in data: the user's mapping first, then FLORES-200's table;
    any other code as it is."""
    return lang_map.get(code) or SHORT.get(code) or code
