"""The package's shape: what a user's run imports never depends on the testbed, and no module outgrows 400 lines."""

import ast
from pathlib import Path

import layermoe_ds

PACKAGE = Path(layermoe_ds.__file__).parent
# The CLI is the one front door to every verb, the testbed's (`build-corpus`, `pretrain`, `demo`, `experiment`)
# included: it may import the testbed, lazily in those verbs' bodies (and their flags' dataclass at parser build).
MAY_IMPORT_TESTBED = ("testbed", "cli")
MAX_LINES = 400


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def product_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in MAY_IMPORT_TESTBED]


def test_no_product_module_imports_the_testbed():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("layermoe_ds.testbed"))
        for p in product_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"modules a user's run imports depend on the testbed: {offenders}"


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path):
    module = PACKAGE / "eval" / "probe_for_layout_test.py"  # a path inside the package, for the relative import
    source = "def f():\n    from layermoe_ds.testbed.corpus import build_corpus\nfrom ..testbed import demo\n"
    tree_names = None
    try:
        module.write_text(source)
        tree_names = imported_modules(module)
    finally:
        module.unlink()
    assert "layermoe_ds.testbed.corpus.build_corpus" in tree_names
    assert "layermoe_ds.testbed.demo" in tree_names


def test_the_testbed_holds_what_builds_the_testbed():
    testbed = {p.relative_to(PACKAGE / "testbed").as_posix() for p in (PACKAGE / "testbed").rglob("*.py")}
    for module in ("corpus.py", "help_html.py", "tokenizer_training.py", "pretrain.py", "demo.py",
                   "experiment/presets.py", "experiment/runner.py"):  # fmt: skip
        assert module in testbed
    for moved in ("data/corpus.py", "data/help_html.py", "training/pretrain.py", "demo.py", "experiment"):
        assert not (PACKAGE / moved).exists()


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
