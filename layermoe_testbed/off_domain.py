"""English from outside the corpus's domain: the Python 3.11 documentation (Debian's `python3.11-doc`, PSF License),
to read forgetting on text the expansion never trained on.

The embedded corpus is one domain, the same LibreOffice help pages in every language: training on its new-language
pages also teaches the old language that domain, so its English test split can improve while English in general
is forgotten. This text is another product's documentation: its tutorial, HOWTOs, FAQ, language reference and
"what's new" pages, prose only (code blocks, tables of contents, navigation and footers left out), one document a
page, all in the test split (`en.test.txt`): it is only ever evaluated. `layermoe data off-domain` runs this.
"""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from layermoe_ds.errors import InputError
from layermoe_ds.io import atomic_write_text, sha256_file
from layermoe_testbed.corpus import deb_field, fetch_deb, unpack_deb
from layermoe_testbed.help_html import normalise

PACKAGE = "python3.11-doc"
HTML_DIR = "usr/share/doc/python3.11/html"
SECTIONS = ("tutorial", "howto", "faq", "reference", "whatsnew")  # the prose; library/ and c-api/ are mostly API lists
LICENSE = "PSF-2.0"
MARKER = "off_domain.json"
BLOCKS = frozenset({"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "blockquote"})
SKIPPED = frozenset({"pre", "script", "style", "table", "nav"})
SKIPPED_CLASSES = frozenset({"highlight", "headerlink", "toctree-wrapper", "sphinxsidebar", "related", "footer"})
_CONTINUED = re.compile(r"^(>>>|\.\.\.|\$ )")  # interpreter prompts that survive as text


class _SphinxPage(HTMLParser):
    """The prose paragraphs of a Sphinx page's main body (`div[role=main]`), code and navigation left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skips its content, opens the main body)
        self._skipping = 0
        self._main = 0  # depth inside the main body
        self._parts: list[str] = []
        self._block = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        skip = tag in SKIPPED or bool(classes & SKIPPED_CLASSES)
        if tag in ("br", "img", "hr", "meta", "link", "input"):
            return
        opens_main = attrs.get("role") == "main"
        self._stack.append((tag, skip, opens_main))
        self._skipping += skip
        self._main += opens_main
        if tag in BLOCKS and self._main and not self._skipping:
            self._flush()
            self._block += 1

    def handle_endtag(self, tag):
        while self._stack:
            open_tag, skip, opens_main = self._stack.pop()
            self._skipping -= skip
            self._main -= opens_main
            if open_tag in BLOCKS and self._block:
                self._block -= 1
                self._flush()
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._main and not self._skipping and self._block:
            self._parts.append(data)

    def _flush(self) -> None:
        text = normalise("".join(self._parts)).replace("¶", "").strip()
        self._parts = []
        if text and not _CONTINUED.match(text):
            self.paragraphs.append(text)


def page_paragraphs(html: str, min_chars: int = 40) -> list[str]:
    """A Sphinx page's prose paragraphs of at least `min_chars` characters, in order."""
    parser = _SphinxPage()
    parser.feed(html)
    parser.close()
    return [p for p in parser.paragraphs if len(p) >= min_chars]


def build_off_domain(out: Path, cache_dir: Path, max_pages: int | None = None) -> dict:
    """Fetch and unpack `python3.11-doc` (cached), extract each page's prose into one line of `out/en.test.txt`, with
    a NOTICE and a marker recording the package, its SHA-256 and the counts. A built directory is reused."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        text = out / "en.test.txt"
        if record.get("max_pages") == max_pages and text.is_file() and sha256_file(text) == record["sha256"]:
            return record
    deb = fetch_deb(PACKAGE, cache_dir)
    html = unpack_deb(deb, cache_dir) / HTML_DIR
    pages = sorted(p for section in SECTIONS for p in (html / section).glob("*.html"))
    if not pages:
        raise InputError(f"{deb.name}: no pages under {HTML_DIR}/{{{','.join(SECTIONS)}}}")
    if max_pages is not None:  # a deterministic slice (tests)
        pages = sorted(pages, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())[:max_pages]
    documents = []
    for page in pages:
        paragraphs = page_paragraphs(page.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            documents.append(" ".join(paragraphs))
    out.mkdir(parents=True, exist_ok=True)
    text = out / "en.test.txt"
    atomic_write_text(text, "".join(d + "\n" for d in documents))
    copyright_file = html.parents[3] / "share" / "doc" / PACKAGE / "copyright"
    copyright_text = copyright_file.read_text(encoding="utf-8", errors="replace") if copyright_file.is_file() else ""
    atomic_write_text(out / "NOTICE.python-doc.txt", f"Text extracted from Debian's {PACKAGE} package (the Python "
                      f"documentation, {LICENSE}).\nCopyright file of {deb.name}:\n\n{copyright_text}")  # fmt: skip
    record = {
        "source": f"Debian {PACKAGE}: {', '.join(SECTIONS)} pages, prose only, one document a page",
        "license": LICENSE,
        "package": {"file": deb.name, "version": deb_field(deb, "Version"), "sha256": sha256_file(deb)},
        "max_pages": max_pages,
        "pages": len(pages),
        "documents": len(documents),
        "characters": sum(len(d) for d in documents),
        "sha256": sha256_file(text),
    }
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    return record
