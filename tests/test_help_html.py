from layermoe_testbed.help_html import extract_paragraphs, latin_fraction, normalise

PAGE = """<!DOCTYPE html><html lang="en-US"><head><title>T</title><script>var x = "<p id='par_id0'>no</p>";</script>
</head><body><header><p id="par_id9" class="paragraph">Header text outside the display area.</p></header>
<div id="DisplayArea" itemprop="softwareHelp">
  <h1 id="hd_id1" dir="auto"><a name="x"></a>Opening   Documents</h1>
  <p id="par_id2" class="paragraph">Choose <span class="menuitem">File – Open</span> to pick<br>a file.</p>
  <p id="par_id3" class="paragraph">Enter <span id="swln1" class="switchinline"><span hidden="true" id="MAC1"
     class="MAC">Preferences</span><span hidden="true" id="default1">Tools - Options</span></span> now.</p>
  <p id="par_id4" class="bascode">Sub Main</p>
  <div class="bascode"><p id="par_id5" class="paragraph">Dim a As Integer</p></div>
  <p class="embedded">Embedded text from another page has no id.</p>
  <p id="par_id2" class="paragraph">A repeated id keeps the first paragraph.</p>
  <p id="par_id6">Cafe\u0301 <code>x = 1</code> done</p>
  <img src="a.png"><p id="par_id7">After a void tag.</p>
</div>
<p id="par_id8">After the display area.</p></body></html>"""


def test_extracts_keyed_paragraphs_of_the_display_area_only():
    paragraphs = extract_paragraphs(PAGE)
    assert paragraphs == {
        "hd_id1": "Opening Documents",
        "par_id2": "Choose File – Open to pick a file.",
        "par_id3": "Enter Tools - Options now.",
        "par_id6": "Café done",
        "par_id7": "After a void tag.",
    }


def test_normalise_is_nfc_and_collapses_space():
    assert normalise(" a\u0301\n\t b ") == "á b"


def test_latin_fraction():
    assert latin_fraction("Привет мир") == 0.0
    assert latin_fraction("Привет LibreOffice") == 11 / 17
    assert latin_fraction("123 !") == 0.0
