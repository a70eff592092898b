"""Build the embedded multilingual corpus from Debian's `libreoffice-help-*` packages (MPL-2.0).

The help pages are translated paragraph by paragraph, so the corpus is parallel: the split is made by page, the
same pages in every language, and valid/test are translations of each other. `layermoe data build` runs this.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from layermoe_ds.errors import InputError
from layermoe_ds.io import atomic_write_text, sha256_file
from layermoe_testbed.help_html import extract_paragraphs, latin_fraction

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
LICENSE = "MPL-2.0"
REFERENCE_LANG = "en"


@dataclass(frozen=True)
class HelpLanguage:
    code: str  # our language code, used in file names
    package: str  # Debian package suffix
    help_dir: str  # directory under /usr/share/libreoffice/help
    latin_script: bool


LANGUAGES = {
    lang.code: lang
    for lang in (
        HelpLanguage("en", "en-us", "en-US", True),
        HelpLanguage("de", "de", "de", True),
        HelpLanguage("fr", "fr", "fr", True),
        HelpLanguage("es", "es", "es", True),
        HelpLanguage("it", "it", "it", True),
        HelpLanguage("ru", "ru", "ru", False),
        HelpLanguage("el", "el", "el", False),
        HelpLanguage("zh", "zh-cn", "zh-CN", False),
    )
}
DEFAULT_LANGS = ("en", "de", "fr", "ru", "el", "es", "it")  # the demo's: old, new, and the lifelong third group


@dataclass(frozen=True)
class CorpusOptions:
    langs: tuple[str, ...] = DEFAULT_LANGS
    min_chars: int = 24
    max_latin_fraction: float = 0.5  # for non-Latin-script languages: above this, the paragraph is untranslated
    max_pages: int | None = None  # a deterministic slice of pages (tests); None = all

    def __post_init__(self) -> None:
        unknown = [lang for lang in self.langs if lang not in LANGUAGES]
        if unknown:
            raise InputError(f"data.langs: unknown language(s) {unknown}; available: {sorted(LANGUAGES)}")
        if len(set(self.langs)) != len(self.langs):
            raise InputError(f"data.langs: duplicate language in {list(self.langs)}")
        if self.min_chars < 1:
            raise InputError(f"data.min_chars: {self.min_chars} must be >= 1")
        if self.max_pages is not None and self.max_pages < 1:
            raise InputError(f"data.max_pages: {self.max_pages} must be >= 1")


def split_of(page: str) -> str:
    """Deterministic page → split (≈ 90/5/5) from a hash of the page's path, the same in every language."""
    bucket = int(hashlib.sha256(page.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else ("valid" if bucket < 95 else "test")


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def fetch_package(lang: HelpLanguage, cache_dir: Path) -> Path:
    """Return the cached .deb of `lang`'s help pages, downloading it when absent."""
    return fetch_deb(f"libreoffice-help-{lang.package}", cache_dir)


@contextlib.contextmanager
def cache_lock(cache_dir: Path):
    """One process at a time fetches or unpacks into `cache_dir` (two builds at once, e.g. test workers, would
    otherwise download the same package into the same file, or unpack over each other)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_deb(name: str, cache_dir: Path) -> Path:
    """Return the cached .deb of Debian package `name`, downloading it with `apt-get download` when absent."""
    with cache_lock(cache_dir):
        return _fetch_deb(name, cache_dir)


def _fetch_deb(name: str, cache_dir: Path) -> Path:
    cached = sorted(cache_dir.glob(f"{name}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise InputError(f"cannot fetch {name}: apt-get not found (the corpus is built from Debian packages)")
    result = _run(["apt-get", "download", name], cwd=cache_dir)
    lists_missing = "Unable to locate" in result.stderr or "No packages found" in result.stderr
    if result.returncode != 0 and lists_missing and os.geteuid() == 0:
        log.info("package lists missing: running apt-get update")
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise InputError(f"apt-get update failed: {update.stderr.strip()[-400:]}")
        result = _run(["apt-get", "download", name], cwd=cache_dir)
    cached = sorted(cache_dir.glob(f"{name}_*.deb"))
    if result.returncode != 0 or not cached:
        hint = " The package lists are missing: run `apt-get update` as root, then retry." if lists_missing else ""
        raise InputError(f"apt-get download {name} failed: {result.stderr.strip()[-400:]}{hint}")
    return cached[-1]


def deb_field(deb: Path, field: str) -> str:
    result = _run(["dpkg-deb", "-f", str(deb), field])
    if result.returncode != 0:
        raise InputError(f"dpkg-deb -f {deb} {field} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def unpack_package(deb: Path, lang: HelpLanguage, cache_dir: Path) -> Path:
    """Unpack `deb` once and return its help directory for `lang`."""
    help_dir = unpack_deb(deb, cache_dir) / "usr/share/libreoffice/help" / lang.help_dir
    if not help_dir.is_dir():
        raise InputError(f"{deb.name} has no help directory {lang.help_dir}")
    return help_dir


def unpack_deb(deb: Path, cache_dir: Path) -> Path:
    """Unpack `deb` once (marker file) under `cache_dir/unpacked/`; returns the root of its file tree."""
    root = cache_dir / "unpacked" / deb.stem
    marker = root / ".unpacked"
    with cache_lock(cache_dir):
        _unpack_once(deb, root, marker)
    return root


def _unpack_once(deb: Path, root: Path, marker: Path) -> None:
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        result = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if result.returncode != 0:
            raise InputError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")
        marker.touch()


def list_pages(help_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(help_dir)) for p in help_dir.glob("text/**/*.html"))


def _read_language(help_dir: str, pages: Sequence[str]) -> dict[str, dict[str, str]]:
    out = {}
    for page in pages:
        path = Path(help_dir) / page
        out[page] = extract_paragraphs(path.read_text(encoding="utf-8")) if path.exists() else {}
    return out


def select_paragraphs(
    pages: dict[str, dict[str, dict[str, str]]], langs: Iterable[str], options: CorpusOptions
) -> dict[str, dict[str, list[str]]]:
    """Filter and deduplicate keyed paragraphs: `pages[lang][page][key]` → `out[lang][split]` lists of text.

    Dropped: short paragraphs, untranslated ones (identical to English, or mostly Latin letters in a non-Latin
    language) and duplicates. Duplicates are removed across splits in train → valid → test order, so no
    held-out paragraph also occurs in train.
    """
    reference = pages.get(REFERENCE_LANG, {})
    page_order = sorted({page for per_lang in pages.values() for page in per_lang})
    out: dict[str, dict[str, list[str]]] = {}
    for lang in langs:
        spec = LANGUAGES[lang]
        seen: set[str] = set()
        out[lang] = {split: [] for split in SPLITS}
        for split in SPLITS:
            for page in (p for p in page_order if split_of(p) == split):
                for key, text in pages[lang].get(page, {}).items():
                    if len(text) < options.min_chars or text in seen:
                        continue
                    if lang != REFERENCE_LANG and reference.get(page, {}).get(key) == text:
                        continue
                    if not spec.latin_script and latin_fraction(text) > options.max_latin_fraction:
                        continue
                    seen.add(text)
                    out[lang][split].append(text)
    return out


def build_corpus(out_dir: Path, cache_dir: Path, options: CorpusOptions, workers: int = 2) -> dict:
    """Fetch, extract, filter and split; write `<lang>.<split>.txt` (one paragraph a line) and `manifest.json`."""
    langs = list(options.langs)
    fetch_langs = langs if REFERENCE_LANG in langs else [REFERENCE_LANG, *langs]
    debs = {lang: fetch_package(LANGUAGES[lang], cache_dir) for lang in fetch_langs}
    help_dirs = {lang: unpack_package(debs[lang], LANGUAGES[lang], cache_dir) for lang in fetch_langs}
    pages_list = list_pages(help_dirs[REFERENCE_LANG])
    if options.max_pages is not None:
        pages_list = sorted(pages_list, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[: options.max_pages]
    log.info("extracting %d pages in %d languages", len(pages_list), len(fetch_langs))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {lang: pool.submit(_read_language, str(help_dirs[lang]), pages_list) for lang in fetch_langs}
        pages = {lang: fut.result() for lang, fut in tqdm(futures.items(), desc="languages", disable=None)}
    selected = select_paragraphs(pages, langs, options)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for lang in langs:
        for split in SPLITS:
            texts = selected[lang][split]
            if not texts:
                raise InputError(f"language {lang!r} has no {split} paragraphs after filtering")
            path = out_dir / f"{lang}.{split}.txt"
            atomic_write_text(path, "".join(t + "\n" for t in texts))
            files[path.name] = {
                "lang": lang,
                "split": split,
                "paragraphs": len(texts),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
    # help_dir = <root>/usr/share/libreoffice/help/<lang>; the copyright file is <root>/usr/share/doc/<package>.
    copyright_src = (
        help_dirs[REFERENCE_LANG].parents[2] / "doc" / f"libreoffice-help-{LANGUAGES[REFERENCE_LANG].package}"
    )
    notice = out_dir / "NOTICE.libreoffice-help.txt"
    copyright_text = (copyright_src / "copyright").read_text(encoding="utf-8", errors="replace")
    atomic_write_text(
        notice,
        "Text extracted from Debian's libreoffice-help-* packages (LibreOffice help, "
        f"{LICENSE}).\nCopyright file of {debs[REFERENCE_LANG].name}:\n\n{copyright_text}",
    )
    manifest = {
        "source": "Debian libreoffice-help-* packages",
        "license": LICENSE,
        "license_notice": notice.name,
        "packages": {
            lang: {"file": deb.name, "version": deb_field(deb, "Version"), "sha256": sha256_file(deb)}
            for lang, deb in debs.items()
        },
        "options": {
            "langs": langs,
            "min_chars": options.min_chars,
            "max_latin_fraction": options.max_latin_fraction,
            "max_pages": options.max_pages,
        },
        "pages": len(pages_list),
        "split_rule": "sha256(page path) % 100: <90 train, <95 valid, else test",
        "files": files,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def corpus_is_built(out_dir: Path, options: CorpusOptions) -> bool:
    """True when `out_dir` holds a complete corpus built with the same options (files match the manifest)."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text())
    wanted = {
        "langs": list(options.langs),
        "min_chars": options.min_chars,
        "max_latin_fraction": options.max_latin_fraction,
        "max_pages": options.max_pages,
    }
    if manifest.get("options") != wanted:
        return False
    return all(
        (out_dir / name).exists() and os.path.getsize(out_dir / name) == meta["bytes"]
        for name, meta in manifest.get("files", {}).items()
    )
