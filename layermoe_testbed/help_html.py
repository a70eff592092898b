"""Extract keyed paragraphs from LibreOffice help pages (the embedded corpus's source format).

Every help page exists in every language with the same paragraph ids (`par_id…`, `hd_id…`), which makes the
corpus parallel: the same key in two languages is a translation of the same paragraph.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
SKIPPED_TAGS = frozenset({"script", "style", "code", "pre", "noscript", "head"})
# Platform-specific alternatives inside `switchinline` spans: the default text is kept, Mac/Windows/Unix variants
# are dropped so a paragraph reads as one sentence.
PLATFORM_CLASSES = frozenset({"MAC", "WIN", "UNX", "LINUX"})
CODE_CLASSES = frozenset({"bascode", "code", "pycode", "input", "literal_code", "example", "debug", "bug"})
KEY_PATTERN = re.compile(r"^(par_id|hd_id)")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFC-normalise and collapse white space (help pages wrap lines arbitrarily)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


class _HelpPageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skips content, opens DisplayArea)
        self._skip_depth = 0
        self._display_depth = 0
        self._key: str | None = None
        self._key_tag: str | None = None
        self._parts: list[str] = []

    def _is_skipped(self, tag: str, attrs: dict[str, str | None]) -> bool:
        classes = set((attrs.get("class") or "").split())
        if tag in SKIPPED_TAGS or classes & CODE_CLASSES or classes & PLATFORM_CLASSES:
            return True
        # A hidden span inside a switchinline is a platform alternative unless it is the default one.
        return tag == "span" and "hidden" in attrs and not (attrs.get("id") or "").startswith("default")

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            self.handle_startendtag(tag, attr_list)
            return
        attrs = dict(attr_list)
        opens_display = tag == "div" and attrs.get("id") == "DisplayArea"
        skipped = self._is_skipped(tag, attrs)
        self._stack.append((tag, skipped, opens_display))
        self._display_depth += opens_display
        self._skip_depth += skipped
        key = attrs.get("id") or ""
        if (
            self._key is None
            and self._display_depth
            and not self._skip_depth
            and tag in {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
            and KEY_PATTERN.match(key)
        ):
            self._key, self._key_tag, self._parts = key, tag, []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and self._key is not None:
            self._parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or not any(t == tag for t, _, _ in self._stack):
            return
        while self._stack:
            open_tag, skipped, opened_display = self._stack.pop()
            self._skip_depth -= skipped
            self._display_depth -= opened_display
            if open_tag == self._key_tag and self._key is not None:
                text = normalise("".join(self._parts))
                if text and self._key not in self.paragraphs:
                    self.paragraphs[self._key] = text
                self._key = self._key_tag = None
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._key is not None and not self._skip_depth:
            self._parts.append(data)


def extract_paragraphs(html: str) -> dict[str, str]:
    """Map paragraph id → normalised text for the main display area of one help page."""
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def latin_fraction(text: str) -> float:
    """Share of letters that are Latin script (detects untranslated paragraphs in non-Latin languages)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    latin = sum(1 for c in letters if "LATIN" in unicodedata.name(c, ""))
    return latin / len(letters)
