"""Exports against every transformers the project declares: each tested family's tiny model is upcycled with the
installed transformers, then loaded through remote code alone and made to generate (KV cache = no cache) in a
fresh virtual environment per transformers version, holding nothing but torch and that transformers.

    python scripts/transformers_compat.py                  # 5.0, 5.3 | 5.4 (configs became dataclasses), 5.12, 5.25
    python scripts/transformers_compat.py --versions 5.0.0,5.25.0

Needs the package registry (one environment per version, cached under ~/.cache/layermoe_ds/). The dense models
run beside: an export that fails exactly as its dense model does is that transformers' own failure, and is
reported as such. Writes bench/results/transformers_compat.json (date, commit, command) and exits 1 if any export
fails where its dense model does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

DEFAULT_VERSIONS = "5.0.0,5.3.0,5.4.0,5.12.1,5.25.0"  # the oldest, both sides of the dataclass change, newest
CACHE = Path.home() / ".cache" / "layermoe_ds"


def environment(version: str, torch_version: str) -> Path:
    """A virtual environment with torch and transformers==`version` alone (made once, then reused)."""
    venv = CACHE / f"transformers-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version}", f"transformers=={version}"]
        subprocess.run(pip, check=True)
    return python


def exports(root: Path) -> list[Path]:
    """Every tested family's tiny dense model (no tokenizer), upcycled: `root/<family>/moe`."""
    import torch
    import transformers

    from layermoe_ds.cli import main
    from tests.test_families import ALLOCATION, TESTED, dense_config

    (root / "alloc.json").write_text(json.dumps(ALLOCATION))
    made = []
    for family in TESTED:
        torch.manual_seed(0)
        config = dense_config(family, 512, pad_token_id=0, eos_token_id=1, bos_token_id=None)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family / "dense")
        argv = ["upcycle", "--model", str(root / family / "dense"), "--allocation", str(root / "alloc.json")]
        if main([*argv, "--out", str(root / family / "moe")]) != 0:
            raise SystemExit(f"upcycle failed for {family}")
        made.append(root / family / "moe")
    return made


def _verdict(result) -> str:
    if isinstance(result, str):
        return result.split("\n")[0]
    return "ok" if result[1] and result[2] == 14 else f"cached generation differs from uncached ({result[0]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default=DEFAULT_VERSIONS, help="transformers versions, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transformers_compat.json")
    args = parser.parse_args(argv)
    import torch
    import transformers
    from benchlib import write_result

    from tests.test_families import load_and_generate

    results: dict = {"made_with": transformers.__version__, "versions": {}}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        made = exports(Path(tmp))
        for version in args.versions.split(","):
            python = environment(version, torch.__version__.split("+")[0])
            out = load_and_generate(str(python), [path for moe in made for path in (moe, moe.parent / "dense")])
            assert out.pop("imported layermoe_ds") is False
            results["versions"][version] = out
            for moe in made:
                family = moe.parent.name
                verdict = [_verdict(out[f"{family}/{kind}"]) for kind in ("moe", "dense")]
                if verdict[0] == "ok":
                    line = "ok"
                elif verdict[0] == verdict[1]:  # the dense model fails alike: transformers' own
                    line = f"as the dense model: {verdict[0]}"
                else:
                    line = f"FAILED: {verdict[0]} (dense: {verdict[1]})"
                    failed.append(f"{version}/{family}")
                print(f"transformers {version} {family}: {line}")
    results["failed"] = failed
    write_result(args.out, results)
    print(f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else "") + f"; written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
