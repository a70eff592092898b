"""The manual is true: every `layermoe …` command shown in README.md and docs/ is accepted by its verb's parser,
every relative link resolves (file and heading), the README stays a manual (≤ 300 lines, the first multi-GPU
launch early), and the configuration reference is the one the dataclasses generate."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from layermoe_ds.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[tuple[str, bool]]:
    """(command, whole?) for each `layermoe …` command: the lines of code blocks (continuations joined) are whole
    commands; inline code may name a verb and some of its options."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            for part in re.split(r"\s(?:&&|\|\||;)\s", line):
                if part.startswith("layermoe "):
                    found.append((part, True))
    found += [(m, False) for m in re.findall(r"`(layermoe [^`]+)`", text)]
    return found


def placeholders(argv: list[str]) -> list[str]:
    """Ellipses, alternatives and optional parts as the manual writes them: a form the parser can be asked."""
    out = []
    for arg in argv:
        if arg in ("...", "…") or arg.startswith("[") or arg.endswith("]"):
            continue
        out.append(arg.split("\\|")[0].split("|")[0])
    return out


CASES = [(page.relative_to(ROOT), *case) for page in PAGES if page.exists() for case in commands(page.read_text())]


def test_the_manual_shows_commands():
    assert len(CASES) > 40


def subparser(parser, argv: list[str]):
    """(the verb's parser, the arguments after the verb) for `data tokenize …`-style nested verbs too."""
    import argparse

    while argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or argv[0] not in choices:
            break
        parser, argv = choices[argv[0]], argv[1:]
    return parser, argv


@pytest.mark.parametrize("page, command, whole", CASES, ids=[f"{p}:{c[:60]}" for p, c, _ in CASES])
def test_every_command_shown_is_accepted_by_its_parser(page, command, whole):
    """A whole command must parse (one written with `...` only its options are checked); inline code must name a
    verb and options of it."""
    words = shlex.split(command.replace("<", "").replace(">", ""))[1:]
    if words in (["--help"], ["-h"]):
        return
    verb, rest = subparser(build_parser(), placeholders(words))
    assert verb.prog != "layermoe", f"{page}: `{command}`: no such verb"
    known = {option for action in verb._actions for option in action.option_strings}
    given = [arg.split("=")[0] for arg in rest if arg.startswith("--")]
    assert set(given) <= known, f"{page}: `{command}`: {sorted(set(given) - known)} are not options of {verb.prog}"
    if not whole or "..." in words or "…" in words:
        return
    try:
        verb.parse_args(rest)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` is refused by its parser (exit {exc.code})")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and file.suffix == ".md":
                headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)}
                if fragment not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_manual():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first = next(i for i, line in enumerate(lines) if line.startswith("deepspeed --num_gpus 8"))
    assert first < 150
    assert len(list((ROOT / "docs").glob("*.md"))) >= 5


def test_the_configuration_reference_is_current():
    from layermoe_ds.config_reference import reference

    assert (ROOT / "docs" / "config.md").read_text() == reference(), "run: python -m layermoe_ds.config_reference"


def test_the_performance_page_lists_every_result_with_its_provenance():
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_provenance.py"), "--check"])
    assert check.returncode == 0, "run: python scripts/results_provenance.py"
    # The commands shown carry no machine's absolute paths (a worktree, a data directory): any checkout reads them.
    commands = re.findall(r"`(python [^`]*)`", (ROOT / "docs" / "performance.md").read_text())
    assert commands and not [c for c in commands if re.search(r"(^|[\s=])/", c)], commands
