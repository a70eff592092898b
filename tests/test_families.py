"""Every tested Hugging Face decoder family (`modeling/families.py`: TESTED), on tiny random models built from
transformers' own classes: `layermoe upcycle` is exact (every token forced to expert 0 gives the dense logits), the
training loss is the model's own, and the export loads in a process that never imports layermoe_ds and generates
the same tokens with the KV cache as without. The distributed path (stage 1 and 2 on 2 ranks, export) runs on the
families least like Llama: Gemma-3's multimodal wrapper (GeGLU, four norms a layer, layers under
model.language_model) and Phi-3 (one fused gate_up_proj, untied head)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from layermoe_ds.modeling.families import TESTED

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# Each family's config class and what its tiny model needs beyond COMMON (and what makes its head its own).
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}),
    "smollm3": ("SmolLM3Config", {}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "starcoder2": ("Starcoder2Config", {}),
}
ALLOCATION = {"experts_per_layer": [1, 2, 3, 2], "classifier_layers": [1, 2]}


def test_every_tested_family_has_a_tiny_model_here():
    assert sorted(CONFIGS) == sorted(TESTED)


def test_the_family_table_names_families_transformers_has():
    """Every `FAMILIES` entry is a dense model_type this transformers builds, its head and FFN fields exist on it, and
    a LayerMoE model_type reads its dense family's entry."""
    from layermoe_ds.modeling.families import FAMILIES, dense_model_class, family_of

    for model_type, family in FAMILIES.items():
        assert dense_model_class(model_type) is not None, model_type
        config = transformers.AutoConfig.for_model(model_type).get_text_config()
        for field in (family.head.divide_by, family.head.multiply_by, family.head.softcap):
            assert field is None or hasattr(config, field), (model_type, field)
    assert family_of("layermoe_phi3") == FAMILIES["phi3"] and family_of("llama") == family_of("no_such_family")


def dense_config(family: str, vocab: int, **ids):
    """The tiny dense config of `family` (Gemma-3: the multimodal wrapper around a tiny language model)."""
    name, extra = CONFIGS[family]
    config = getattr(transformers, name)(vocab_size=vocab, **COMMON, **ids, **extra)
    if family == "gemma3":  # the multimodal wrapper: this language model beside a one-layer vision tower
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
        specials = {f"{name}_index": vocab - 3 + i for i, name in enumerate(("boi_token", "eoi_token", "image_token"))}
        config = transformers.Gemma3Config(
            text_config=config.to_dict(), vision_config={**vision, "image_size": 28}, mm_tokens_per_image=4, **specials
        )
    return config


def dense_model(family: str, tokenizer) -> torch.nn.Module:
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    torch.manual_seed(0)
    config = dense_config(family, len(tokenizer), **ids)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family == "gemma3":  # its image projection starts at zero: give the image a say
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def families(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """family → directory holding `dense/` (with the test tokenizer) and `moe/` (`layermoe upcycle` of it)."""
    from layermoe_ds.cli import main
    from layermoe_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    root = tmp_path_factory.mktemp("families")
    (root / "alloc.json").write_text(json.dumps(ALLOCATION))
    made = {}
    for family in TESTED:
        dense_model(family, tokenizer).save_pretrained(root / family / "dense")
        tokenizer.save_pretrained(root / family / "dense")
        upcycle = ["upcycle", "--model", str(root / family / "dense"), "--allocation", str(root / "alloc.json")]
        assert main([*upcycle, "--out", str(root / family / "moe")]) == 0, family
        made[family] = root / family
    return made


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", TESTED)
def test_upcycle_is_exact_and_the_training_loss_is_the_models_own(family, families):
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.modeling.families import Layout
    from layermoe_ds.modeling.lm_loss import check_fused_loss, model_nll, shifted_targets, use_chunked_loss

    dense = load_causal_lm(families[family] / "dense")
    moe = load_causal_lm(families[family] / "moe")
    assert type(moe).__name__ == f"LayerMoE{type(dense).__name__}"
    assert moe.config.dense_model_type == dense.config.model_type and sorted(moe.moe_blocks()) == [1, 2, 3]
    ids = batch(dense.config.get_text_config().vocab_size)
    moe.set_force_base(True)
    with torch.no_grad():
        assert torch.equal(moe(input_ids=ids).logits, dense(input_ids=ids).logits)
        own = dense(input_ids=ids, labels=ids).loss
        logits = dense(input_ids=ids).logits.float()
        assert check_fused_loss(dense, family) < 1e-5
        assert use_chunked_loss(dense) > 0  # what training runs: the fused loss, with the family's head
        torch.testing.assert_close(dense(input_ids=ids, labels=ids).loss, own, rtol=1e-5, atol=0)
        # evaluation's summed NLL, through the hidden states and the family's head
        targets = shifted_targets(ids).reshape(ids.shape)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        torch.testing.assert_close(model_nll(dense, ids, torch.ones_like(ids), targets), expected, rtol=1e-5, atol=0)
    # everything outside the FFNs is the dense model's (Gemma-3: its vision tower and projector among them)
    moe_state, layout = moe.state_dict(), Layout.of(moe.config)
    for name, tensor in dense.state_dict().items():
        if name in moe_state:
            assert torch.equal(moe_state[name], tensor), name
        else:  # only the FFNs of MoE layers move (into the block, as expert 0)
            assert layout.split(name)[0] in moe.moe_blocks(), name


def test_gemma3_wrapper_keeps_its_vision_tower_and_sees_images(families):
    """The multimodal wrapper is expanded in its language model alone: an image-and-text forward, every token
    forced to expert 0, gives the dense wrapper's logits."""
    from layermoe_ds.hf.load import load_causal_lm

    dense = load_causal_lm(families["gemma3"] / "dense")
    moe = load_causal_lm(families["gemma3"] / "moe")
    assert type(moe).__name__ == "LayerMoEGemma3ForConditionalGeneration"
    assert moe.config.decoder_layers == "model.language_model.layers"
    config = dense.config
    image = (
        [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image + [config.eoi_token_index]
    )
    ids = torch.cat([batch(config.get_text_config().vocab_size)[:1, :4], torch.tensor([image])], dim=1)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    moe.set_force_base(True)
    with torch.no_grad():
        expected = dense(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(moe(input_ids=ids, pixel_values=pixels).logits, expected)
        assert not torch.equal(dense(input_ids=ids, pixel_values=pixels * 0).logits, expected)  # the image counts


@pytest.mark.parametrize("family", TESTED)
def test_lean_ffn_covers_the_family_and_trains_to_the_bit(family, families):
    """SwiGLU, GeGLU (Gemma) and Phi-3's fused gate_up_proj keep two activations, not three, with bit-identical
    loss and gradients; StarCoder2's plain GELU FFN is not a gated one and keeps autograd's."""
    from layermoe_ds.hf.load import load_causal_lm
    from layermoe_ds.training.lean_ffn import use_lean_ffn

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference, lean = (load_causal_lm(families[family] / "moe").train() for _ in range(2))
    ids = batch(reference.config.get_text_config().vocab_size)
    assert use_lean_ffn(lean) == (0 if family == "starcoder2" else sum(ALLOCATION["experts_per_layer"]))
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(lean), loss_and_grads(reference)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


# Run in a fresh interpreter (any Python with torch and transformers): load each export through remote code alone,
# generate greedily with and without the KV cache; one JSON line, "<family>/<dir>" → [class, same tokens, length] or
# an error.
LOAD_AND_GENERATE = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
out = {}
for path in sys.argv[1:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(2))
        runs = [model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=cache, pad_token_id=0)
                for cache in (True, False)]
        out["/".join(Path(path).parts[-2:])] = [type(model).__name__, torch.equal(*runs), runs[0].shape[1]]
    except Exception as exc:
        out["/".join(Path(path).parts[-2:])] = f"{type(exc).__name__}: {exc}"[:500]
out["imported layermoe_ds"] = any(name.startswith("layermoe_ds") for name in sys.modules)
print(json.dumps(out))
"""


def load_and_generate(python: str, exports: list[Path]) -> dict:
    result = subprocess.run(
        [python, "-c", LOAD_AND_GENERATE, *map(str, exports)], capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_exports_load_without_layermoe_ds_and_generate_the_same_with_the_cache(families):
    """One fresh interpreter loads every family's export through `trust_remote_code` alone."""
    out = load_and_generate(sys.executable, [families[family] / "moe" for family in TESTED])
    assert out.pop("imported layermoe_ds") is False
    assert sorted(out) == sorted(f"{family}/moe" for family in TESTED)
    for family, result in out.items():
        assert isinstance(result, list), (family, result)
        cls, same, length = result
        assert cls.startswith("LayerMoE") and same and length == 14, (family, cls, same, length)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_stage1_and_stage2_on_two_ranks(family, families, corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import base_config, metrics, run

    (tmp_path / "alloc.json").write_text(json.dumps({"experts_per_layer": [3, 1, 3, 2], "classifier_layers": [0]}))
    dense = families[family] / "dense"
    stage1 = base_config(
        dense, corpus_dir, tmp_path / "s1", steps=4, save_every=4, allocation=str(tmp_path / "alloc.json")
    )
    run(1, stage1, tmp_path, "stage1_zero2.json")
    stage2 = base_config(tmp_path / "s1" / "model", corpus_dir, tmp_path / "s2", steps=2, save_every=2)
    run(2, {**stage2, "stage2_docs_per_old_lang": 50, "stage2_docs_per_new_lang": 50}, tmp_path, "stage2.json")
    for stage in ("s1", "s2"):
        records = metrics(tmp_path / stage)
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records.values()), (family, stage)
    before, after = (
        load_file(tmp_path / "s1" / "model" / "model.safetensors"),
        load_file(tmp_path / "s2" / "model" / "model.safetensors"),
    )
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.endswith((".router.weight", ".classifier.weight")) for key in changed), (
        family,
        sorted(changed)[:4],
    )


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_profile_and_evaluate_read_the_family_where_it_keeps_its_layers(family, families, corpus_dir, tmp_path):
    """`profile` hooks each decoder layer's FFN (Gemma-3's under model.language_model), one score a layer;
    `evaluate` of the upcycled model gives the dense model's losses (new experts are copies of the FFN)."""
    from layermoe_ds.cli import main

    data = ["--data", str(corpus_dir)]
    profile = ["profile", "--model", str(families[family] / "dense"), *data, "--old", "en", "--new", "fr,ru"]
    assert main([*profile, "--tokens-per-lang", "300", "--seq-len", "32", "--out", str(tmp_path / "sim.json")]) == 0
    assert len(json.loads((tmp_path / "sim.json").read_text())["layer_score"]) == COMMON["num_hidden_layers"]
    reports = {}
    for kind in ("dense", "moe"):
        evaluate = ["evaluate", "--model", str(families[family] / kind), *data, "--langs", "en,fr", "--old", "en"]
        assert main([*evaluate, "--max-tokens", "300", "--seq-len", "32", "--out", str(tmp_path / f"{kind}.json")]) == 0
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    for lang in ("en", "fr"):
        dense, moe = (reports[kind]["languages"][lang]["loss"] for kind in ("dense", "moe"))
        assert moe == pytest.approx(dense, abs=1e-4), (family, lang)
    assert set(reports["moe"]["routing"]["layers"]) == {"1", "2", "3"}


def test_the_exports_tokenizer_loads_without_a_prompt_and_is_the_dense_ones(families):
    """The export's tokenizer, in a fresh interpreter with no terminal: through its tokenizer class with no remote
    code at all, and through AutoTokenizer with the model's `trust_remote_code=True`; never the remote-code prompt
    (AutoTokenizer without it reads config.json, whose architecture only remote code knows)."""
    script = """
import json, sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
text = "Bonjour le monde, hello world"
dense = AutoTokenizer.from_pretrained(sys.argv[1])(text)["input_ids"]
plain = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])(text)["input_ids"]
auto = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)(text)["input_ids"]
print(json.dumps([dense, plain, auto]))
"""
    for family in ("llama", "gemma3"):
        paths = [str(families[family] / kind) for kind in ("dense", "moe")]
        result = subprocess.run(
            [sys.executable, "-c", script, *paths], capture_output=True, text=True, cwd="/", stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "custom code" not in result.stdout + result.stderr
        dense, plain, auto = json.loads(result.stdout.strip().splitlines()[-1])
        assert dense and plain == dense and auto == dense, family
    generation = json.loads((families["llama"] / "dense" / "generation_config.json").read_text())
    assert json.loads((families["llama"] / "moe" / "generation_config.json").read_text()) == generation
