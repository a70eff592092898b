"""The package's shape: what a user's run imports never depends on the testbed (its own top-level package beside the
product, `layermoe_testbed`), and no module outgrows 400 lines."""

import ast
from pathlib import Path

import layermoe_ds
import layermoe_testbed

PACKAGE = Path(layermoe_ds.__file__).parent
TESTBED = Path(layermoe_testbed.__file__).parent
# The CLI is the one front door to every verb, the testbed's (`build-corpus`, `pretrain`, `demo`, `experiment`)
# included: it may import the testbed, lazily in those verbs' bodies.
MAY_IMPORT_TESTBED = ("cli",)
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
        str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("layermoe_testbed"))
        for p in product_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"modules a user's run imports depend on the testbed: {offenders}"


def test_the_cli_imports_the_testbed_only_inside_its_verbs():
    """Importing the CLI (every `layermoe` call) never loads the testbed: only a testbed verb's body does."""
    top_level = {}
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [
            node.module
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layermoe_testbed")
        ]
        found += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names if "testbed" in a.name]
        if found:
            top_level[path.name] = found
    assert not top_level, f"CLI modules importing the testbed at module level: {top_level}"


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path):
    module = PACKAGE / "eval" / "probe_for_layout_test.py"  # a path inside the package, for the relative import
    source = "def f():\n    from layermoe_testbed.corpus import build_corpus\nfrom ..training import loop\n"
    tree_names = None
    try:
        module.write_text(source)
        tree_names = imported_modules(module)
    finally:
        module.unlink()
    assert "layermoe_testbed.corpus.build_corpus" in tree_names
    assert "layermoe_ds.training.loop" in tree_names


def test_the_testbed_holds_what_builds_the_testbed():
    testbed = {p.relative_to(TESTBED).as_posix() for p in TESTBED.rglob("*.py")}
    for module in ("corpus.py", "help_html.py", "tokenizer_training.py", "pretrain.py", "demo.py",
                   "experiment/presets.py", "experiment/runner.py"):  # fmt: skip
        assert module in testbed
    for moved in ("testbed", "data/corpus.py", "data/help_html.py", "training/pretrain.py", "demo.py", "experiment"):
        assert not (PACKAGE / moved).exists()


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in [*PACKAGE.rglob("*.py"), *TESTBED.rglob("*.py")]
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# What only the DeepSpeed boundary (`layermoe_ds/ds/`) may spell: DeepSpeed's module path, its checkpoint and
# shared-memory file names, its launcher's module.
DEEPSPEED_NAMES = ("deepspeed_moe", "deepspeed_experts", "mp_rank_00", "expp_rank", "deepspeed_allreduce",
                   "deepspeed.launcher")  # fmt: skip


def spelled_strings(path: Path) -> list[str]:
    """The string constants of a module's code (docstrings left out: prose may name what the code does not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]  # fmt: skip


def test_only_the_deepspeed_boundary_imports_deepspeed_or_spells_its_names():
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "ds"]
    outside += sorted(TESTBED.rglob("*.py"))
    imports = {
        str(p.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "deepspeed")
        for p in outside
    }
    spelled = {
        str(p.relative_to(PACKAGE.parent)): sorted(
            {name for s in spelled_strings(p) for name in DEEPSPEED_NAMES if name in s}
        )
        for p in outside
    }
    assert not {k: v for k, v in imports.items() if v}, "import deepspeed outside layermoe_ds/ds/"
    assert not {k: v for k, v in spelled.items() if v}, "DeepSpeed's names spelled outside layermoe_ds/ds/"
    assert {"moe_layer.py", "engine.py", "internals.py", "names.py", "process.py"} <= {
        p.name for p in (PACKAGE / "ds").glob("*.py")
    }


def test_the_boundary_scan_sees_an_import_and_a_spelled_name(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text('"""Docs may say mp_rank_00."""\nimport deepspeed.comm\nNAME = "model.moe.deepspeed_moe.x"\n')
    assert "deepspeed.comm" in imported_modules_of(module)
    assert spelled_strings(module) == ["model.moe.deepspeed_moe.x"]


def imported_modules_of(path: Path) -> set[str]:
    """`imported_modules` for a file outside the package (absolute imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_each_concept_has_one_home():
    """Checkpoints (format, reading, saving and resuming), Hugging Face I/O (reading, writing, the one key and shape
    check, every model source) and DeepSpeed each live in one package; the modules they were split over are gone."""
    homes = {
        "checkpoints": {"format.py", "read.py", "save_load.py"},
        "hf": {"files.py", "load.py", "materialize.py", "sources.py"},
        "ds": {"engine.py", "internals.py", "moe_layer.py", "names.py", "placement.py", "process.py"},
    }
    for package, modules in homes.items():
        assert modules <= {p.name for p in (PACKAGE / package).glob("*.py")}, package
    for gone in ("modeling/checkpoint_files.py", "training/checkpoint.py", "modeling/hf_export.py",
                 "modeling/hf_loading.py", "modeling/streaming.py", "modeling/moe_layer.py", "ds_internals.py",
                 "training/engine.py", "modeling/placement.py"):  # fmt: skip
        assert not (PACKAGE / gone).exists(), gone
    definitions = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name in ("check_tensors", "load_model", "write_model_dir"):
                definitions.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert definitions == {"check_tensors": ["hf/load.py"], "load_model": ["hf/sources.py"],
                           "write_model_dir": ["hf/files.py"]}  # fmt: skip


def test_every_package_folder_is_a_package():
    """`packages = find:` ships only folders with an `__init__.py`: one without is missing from the wheel."""
    folders = {p.parent for p in [*PACKAGE.rglob("*.py"), *TESTBED.rglob("*.py")] if "__pycache__" not in p.parts}
    assert not sorted(str(f.relative_to(PACKAGE.parent)) for f in folders if not (f / "__init__.py").is_file())
