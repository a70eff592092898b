"""The table at the top of docs/performance.md: every bench/results/*.json with the date, commit and command that
produced it (files written before results carried their provenance say so). Rewrites the table between its markers:

    python scripts/results_provenance.py            # update docs/performance.md
    python scripts/results_provenance.py --check    # exit 1 if the page is not current (tests/test_docs.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- results table: scripts/results_provenance.py -->", "<!-- end of results table -->"


def table() -> str:
    rows = ["| results file | date | commit | command |", "| --- | --- | --- | --- |"]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        provenance = json.loads(path.read_text()).get("provenance")
        if provenance:
            cells = [provenance["date"][:10], f"`{provenance['commit'][:12]}`", f"`{provenance['command']}`"]
        else:
            cells = ["—", "—", "not recorded (written before results carried their provenance)"]
        rows.append(f"| [`{path.name}`](../bench/results/{path.name}) | " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, *rows, END])


def current(page: str) -> str:
    start, end = page.index(BEGIN), page.index(END) + len(END)
    return page[:start] + table() + page[end:]


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    if "--check" in argv:
        return 0 if current(page) == page else 1
    PAGE.write_text(current(page))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
