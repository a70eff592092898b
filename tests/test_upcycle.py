"""Upcycling, growth and export of whole models (Llama and Qwen2 families, tiny random configs)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from layermoe_ds.hf.files import save_model
from layermoe_ds.hf.load import load_layermoe
from layermoe_ds.modeling.remote.layermoe_block import LayerMoEBlock
from layermoe_ds.modeling.upcycle import grow, upcycle

ALLOCATION = {"method": "layermoe", "budget": 8, "experts_per_layer": [4, 1, 2, 3], "classifier_layers": [0, 1, 3]}


def tiny_dense(arch: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def perturb_new_experts(model, seed=1):
    """Make new experts differ from expert 0, as training would."""
    torch.manual_seed(seed)
    for block in model.moe_blocks().values():
        for p in block.experts[1:].parameters():
            p.data.add_(torch.randn_like(p) * 0.2)


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_token_on_expert0_reproduces_the_dense_logits(arch):
    dense = tiny_dense(arch)
    model = upcycle(dense, ALLOCATION).eval()
    assert type(model).__name__ == {"llama": "LayerMoELlamaForCausalLM", "qwen2": "LayerMoEQwen2ForCausalLM"}[arch]
    perturb_new_experts(model)
    model.set_force_base(True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=0)
        model.set_force_base(False)
        assert (model(IDS).logits - dense(IDS).logits).abs().max() > 1e-3  # the perturbed experts are used


def test_layout_names_and_dense_layer():
    dense = tiny_dense("llama")
    model = upcycle(dense, ALLOCATION)
    assert sorted(model.moe_blocks()) == [0, 2, 3]
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"  # N_i = 1: the dense FFN itself
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, dense.model.layers[1].mlp.up_proj.weight)
    assert model.config.classifier_layers == [0, 3]  # layer 1 is dense: no classifier there
    names = list(model.state_dict())
    # The names on disk (ds/names.py): experts.K (0 = the FFN), router, classifier
    assert [n for n in names if n.startswith("model.layers.0.mlp.")] == [
        *(f"model.layers.0.mlp.experts.{k}.{p}_proj.weight" for k in range(4) for p in ("gate", "up", "down")),
        "model.layers.0.mlp.router.weight",
        "model.layers.0.mlp.classifier.weight",
    ]
    for layer, block in model.moe_blocks().items():
        assert block.gate.top_k == min(2, model.config.experts_per_layer[layer])
        for expert in block.experts[1:]:  # new experts start as copies of the original FFN
            torch.testing.assert_close(expert.gate_proj.weight, block.experts[0].gate_proj.weight)
    # xavier-normal router, seeded: the same model every time
    again = upcycle(dense, ALLOCATION)
    assert torch.equal(again.model.layers[0].mlp.router.weight, model.model.layers[0].mlp.router.weight)
    assert model.config.allocation["history"][0]["experts_per_layer"] == [4, 1, 2, 3]


def test_unknown_architecture_and_wrong_allocation_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    found = r"'gpt2' \(GPT2LMHeadModel\): no decoder layers at model.layers \(its modules: transformer, lm_head\)"
    with pytest.raises(ValueError, match=found):
        upcycle(gpt2, ALLOCATION)
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 layers"):
        upcycle(tiny_dense("llama"), {"experts_per_layer": [2, 2, 2]})


def test_models_that_cannot_be_expanded_say_what_was_found():
    from transformers import BartConfig, MixtralConfig

    from layermoe_ds.modeling.families import expandable

    with pytest.raises(ValueError, match=r"'mixtral' \(MixtralConfig\) is a mixture of experts already \(num_local"):
        expandable(MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"'bart' \(BartConfig\) is an encoder-decoder"):
        expandable(BartConfig(encoder_layers=1, decoder_layers=1, d_model=32))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_reload_gives_identical_logits(arch, tmp_path):
    model = upcycle(tiny_dense(arch), ALLOCATION, classifier_mode="prefix-mean").eval()
    perturb_new_experts(model)
    model.set_classifier_routing(True)
    save_model(model, tmp_path / "m")
    assert {"modeling_layermoe.py", "configuration_layermoe.py", "layermoe_block.py"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    reloaded = load_layermoe(tmp_path / "m")
    assert reloaded.config.classifier_mode == "prefix-mean" and reloaded.config.classifier_routing
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


REMOTE_LOAD = r"""
import sys, json, torch
sys.modules["deepspeed"] = None      # neither DeepSpeed nor layermoe_ds may be needed to load the export
sys.modules["layermoe_ds"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = model(ids, labels=ids)
    generated = model.generate(ids[:1, :4], min_new_tokens=5, max_new_tokens=5, do_sample=False)
print(json.dumps({"module": type(model).__module__, "loss": out.loss.item(),
                  "logits": out.logits[0, -1, :5].tolist(), "generated": generated.shape[1]}))
"""


def test_export_loads_with_plain_transformers_remote_code(tmp_path):
    model = upcycle(tiny_dense("llama"), ALLOCATION).eval()
    perturb_new_experts(model)
    save_model(model, tmp_path / "m")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "m"), json.dumps(IDS.tolist())],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules") and out["generated"] == 9
    with torch.no_grad():
        expected = model(IDS, labels=IDS)
    assert out["loss"] == pytest.approx(expected.loss.item(), abs=1e-5)
    assert out["logits"] == pytest.approx(expected.logits[0, -1, :5].tolist(), abs=1e-5)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_model(upcycle(tiny_dense("llama"), ALLOCATION), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["experts_per_layer"] = [4, 1, 2, 4]
    config["expert_groups"][3] = [0, 1, 1, 1]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \['model.layers.3.mlp.experts.3"):
        load_layermoe(tmp_path / "m")
    config["experts_per_layer"], config["expert_groups"][3] = [4, 1, 2, 3], [0, 1, 1]
    config["classifier_layers"] = [0]  # layer 3 loses its classifier: the stored tensor is unexpected
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.3.mlp.classifier.weight'\]"):
        load_layermoe(tmp_path / "m")


@pytest.mark.parametrize("router", ["keep", "reinit"])
def test_grow_keeps_old_experts_and_adds_a_group(router):
    model = upcycle(tiny_dense("llama"), ALLOCATION).eval()
    perturb_new_experts(model)
    model.set_classifier_routing(True)
    grown = grow(model, {"experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1]}, router=router).eval()
    assert grown.config.experts_per_layer == [5, 3, 2, 4]
    assert grown.config.expert_groups == [[0, 1, 1, 1, 2], [0, 2, 2], [0, 1], [0, 1, 1, 2]]
    assert grown.config.num_groups == 3 and grown.config.classifier_layers == [0, 1, 3]
    old0, new0 = model.model.layers[0].mlp, grown.model.layers[0].mlp
    for k in range(4):  # old experts keep their ids and weights
        torch.testing.assert_close(new0.experts[k].up_proj.weight, old0.experts[k].up_proj.weight)
    torch.testing.assert_close(new0.experts[4].up_proj.weight, old0.experts[0].up_proj.weight)  # copy of FFN
    assert isinstance(grown.model.layers[1].mlp, LayerMoEBlock)  # a dense layer became MoE, FFN = expert 0
    torch.testing.assert_close(
        grown.model.layers[1].mlp.experts[0].up_proj.weight, model.model.layers[1].mlp.up_proj.weight
    )
    kept = torch.equal(new0.router.weight[:4], old0.router.weight)
    assert kept == (router == "keep")
    # Layer 2 gains no expert: its router stays whole under either policy (the reference re-initialises only
    # the routers of layers that grow).
    assert torch.equal(grown.model.layers[2].mlp.router.weight, model.model.layers[2].mlp.router.weight)
    assert new0.classifier.weight.shape[0] == 3
    assert grown.config.allocation["history"][1]["experts_per_layer"] == [2, 3, 1, 2]


def test_grown_model_without_its_new_experts_reproduces_the_previous_model():
    model = upcycle(tiny_dense("qwen2"), ALLOCATION).eval()
    perturb_new_experts(model)
    model.set_classifier_routing(True)
    grown = grow(model, {"experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1]}, router="keep").eval()
    torch.manual_seed(5)
    for block in grown.moe_blocks().values():  # train-like change of the group-2 experts only
        for expert, group in zip(block.experts[1:], block.gate.expert_groups[1:], strict=True):
            if group == 2:
                for p in expert.parameters():
                    p.data.add_(torch.randn_like(p) * 0.2)
    grown.set_classifier_routing(True)
    grown.set_max_group(1)
    with torch.no_grad():
        torch.testing.assert_close(grown(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
        grown.set_max_group(None)
        assert (grown(IDS).logits - model(IDS).logits).abs().max() > 1e-4


def test_upcycle_and_grow_commands(tiny_base, tmp_path, capsys):
    from layermoe_ds.cli import main

    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"method": "layermoe", "experts_per_layer": [3, 1, 2], "classifier_layers": [0]}))
    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_base), "--allocation", str(alloc), "--out", str(out)]) == 0
    assert "experts per layer [3, 1, 2]" in capsys.readouterr().out
    assert main(["upcycle", "--model", str(tiny_base), "--allocation", str(alloc), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["upcycle", "--model", str(out), "--allocation", str(alloc), "--out", str(tmp_path / "x")]) == 2
    assert "already a LayerMoE model" in capsys.readouterr().err
    assert main(["grow", "--model", str(out), "--allocation", str(alloc), "--out", str(tmp_path / "g")]) == 0
    assert "3 language groups" in capsys.readouterr().out
    from layermoe_ds.hf.load import load_causal_lm

    assert load_causal_lm(tmp_path / "g").config.experts_per_layer == [5, 1, 3]


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_streamed_upcycle_writes_exactly_the_in_memory_model(arch, dtype, tmp_path, caplog):
    """`upcycle_dir` reads the dense directory tensor by tensor and writes shard by shard, in the input's dtype: the
    same tensors as `upcycle` + `save_model`, sharded with an index when asked, and without a tokenizer."""
    from safetensors.torch import load_file

    from layermoe_ds.hf.files import INDEX
    from layermoe_ds.modeling.upcycle import upcycle_dir

    dense = tiny_dense(arch).to(dtype)
    dense.save_pretrained(tmp_path / "dense")  # weights only: no tokenizer in the directory
    save_model(upcycle(dense, ALLOCATION, seed=3), tmp_path / "memory")
    config = upcycle_dir(tmp_path / "dense", ALLOCATION, tmp_path / "streamed", seed=3, max_shard_bytes=20_000)
    assert config.dtype == dtype and "no tokenizer files" in caplog.text
    shards = sorted((tmp_path / "streamed").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "streamed" / INDEX).is_file()
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())
    streamed = {}
    for shard in shards:
        streamed.update(load_file(shard))
    assert set(index["weight_map"]) == set(streamed)
    reference = load_file(tmp_path / "memory" / "model.safetensors")
    assert streamed.keys() == reference.keys()
    for key, value in reference.items():
        assert streamed[key].dtype == dtype and torch.equal(streamed[key], value), key
    ours = json.loads((tmp_path / "streamed" / "config.json").read_text())
    theirs = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert ours == theirs
    assert sorted(p.name for p in (tmp_path / "streamed").glob("*.py")) == sorted(
        p.name for p in (tmp_path / "memory").glob("*.py")
    )
    reloaded = load_layermoe(tmp_path / "streamed", dtype)  # sharded weights verified and loaded
    ids = torch.randint(0, 97, (2, 9))
    expected = load_layermoe(tmp_path / "memory", dtype)(input_ids=ids).logits  # the same load path, same buffers
    assert torch.equal(reloaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("router", ["keep", "reinit"])
def test_streamed_grow_writes_exactly_the_in_memory_model(router, tmp_path):
    from safetensors.torch import load_file

    from layermoe_ds.modeling.upcycle import grow_dir

    model = upcycle(tiny_dense("llama"), ALLOCATION, seed=1)
    perturb_new_experts(model)
    save_model(model, tmp_path / "g1")
    second = {"method": "layermoe", "experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1, 2]}
    save_model(grow(model, second, router, seed=5), tmp_path / "memory")
    config = grow_dir(tmp_path / "g1", second, tmp_path / "streamed", router, seed=5)
    assert config.experts_per_layer == [5, 3, 2, 4] and config.num_groups == 3
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    reference = load_file(tmp_path / "memory" / "model.safetensors")
    assert streamed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(streamed[key], value), key
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "memory" / "config.json").read_text()
    )


def test_grow_with_the_new_allocations_classifiers_alone(tmp_path):
    """`--classifiers new` (the reference's lifelong policy): classifier layers are the new allocation's only,
    streamed and in memory alike; `union` (default) keeps the earlier ones."""
    from safetensors.torch import load_file

    from layermoe_ds.modeling.upcycle import grow_dir

    model = upcycle(tiny_dense("llama"), ALLOCATION, seed=1)  # classifiers on 0, 1, 3
    save_model(model, tmp_path / "g1")
    second = {"method": "layermoe", "experts_per_layer": [2, 3, 1, 2], "classifier_layers": [1, 3]}
    grown = grow(model, second, classifiers="new")
    assert grown.config.classifier_layers == [1, 3] and grown.model.layers[0].mlp.classifier is None
    # Layer 3 keeps its classifier: its old classes' rows carry over, one class is added.
    old3, new3 = model.model.layers[3].mlp.classifier.weight, grown.model.layers[3].mlp.classifier
    assert torch.equal(new3.weight[:2], old3)
    assert grow(model, second).config.classifier_layers == [0, 1, 3]
    save_model(grown, tmp_path / "memory")
    grow_dir(tmp_path / "g1", second, tmp_path / "streamed", classifiers="new")
    streamed, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("streamed", "memory"))
    assert streamed.keys() == reference.keys() and all(torch.equal(streamed[k], v) for k, v in reference.items())
    with pytest.raises(ValueError, match="grow --classifiers: 'both' is not one of union, new"):
        grow(model, second, classifiers="both")
