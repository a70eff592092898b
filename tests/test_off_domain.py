"""English from outside the corpus's domain (the Python docs, `layermoe data off-domain`): prose only, one document
a page, all test; built once and reused."""

import json

import pytest

from layermoe_ds.cli import main
from layermoe_testbed.off_domain import MARKER, page_paragraphs
from tests.conftest import CACHE

PAGE = """<html><head><title>t</title><style>p {}</style></head><body>
<div class="related" role="navigation"><p>Navigation that is not the page's text at all.</p></div>
<div class="body" role="main">
<h1>Control Flow Tools<a class="headerlink" href="#x">¶</a></h1>
<p>Besides the <code>while</code> statement just introduced, Python uses the usual control flow statements.</p>
<div class="highlight-python3"><div class="highlight"><pre>&gt;&gt;&gt; x = int(input("Please enter an integer: "))
</pre></div></div>
<ul><li><p>Perhaps the most well-known statement type is the if statement, with optional elif parts.</p></li></ul>
<p>Short.</p>
<table><tr><td>A table cell long enough to be kept if tables were read, which they are not.</td></tr></table>
</div>
<div class="footer"><p>Copyright 2001-2023, Python Software Foundation, and a long footer line.</p></div>
</body></html>"""


def test_prose_only_in_order():
    assert page_paragraphs(PAGE, min_chars=10) == [
        "Control Flow Tools",
        "Besides the while statement just introduced, Python uses the usual control flow statements.",
        "Perhaps the most well-known statement type is the if statement, with optional elif parts.",
    ]


def test_off_domain_from_the_debian_package(tmp_path, capsys):
    out = tmp_path / "off"
    argv = ["data", "off-domain", "--out", str(out), "--cache", str(CACHE), "--max-pages", "3"]
    try:
        code = main(argv)
    except Exception as exc:  # noqa: BLE001 (apt's own errors: no network, no package lists)
        pytest.skip(f"Debian's python3.11-doc cannot be fetched here: {exc}")
    if code != 0:
        pytest.skip(f"Debian's python3.11-doc cannot be fetched here: {capsys.readouterr().err.strip()[-300:]}")
    record = json.loads((out / MARKER).read_text())
    lines = (out / "en.test.txt").read_text().splitlines()
    assert record["pages"] == 3 and record["documents"] == len(lines) >= 2 and record["license"] == "PSF-2.0"
    assert all(len(line) > 200 and ">>>" not in line[:10] for line in lines)
    assert "python3.11-doc" in (out / "NOTICE.python-doc.txt").read_text()
    mtime = (out / "en.test.txt").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "en.test.txt").stat().st_mtime_ns == mtime  # reused, not rebuilt
