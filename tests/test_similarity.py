import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layermoe_ds.analysis.similarity import (
    SCORE_RULE_SINGLE_NEW,
    SimilarityAccumulator,
    layer_scores,
    pair_names,
    profile_blocks,
    profile_model,
)


def brute_force_similarity(a_TH: torch.Tensor, b_TH: torch.Tensor) -> float:
    """The slow twin: mean cosine over every token pair, a T_a × T_b matrix."""
    return torch.nn.functional.cosine_similarity(a_TH[:, None, :], b_TH[None, :, :], dim=-1).double().mean().item()


def test_hand_built_states_give_hand_computed_similarity():
    acc = SimilarityAccumulator(num_layers=1, num_langs=3, hidden=2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    hidden = torch.stack([e1, 3 * e1, e1, 5 * e2, -e1, -2 * e1])
    lang = torch.tensor([0, 0, 1, 1, 2, 2])
    acc.add(0, hidden, lang)
    acc.count(lang)
    s = acc.matrix()[0]
    assert s[0, 1].item() == pytest.approx(0.5)  # cos(e1,e1)=1 twice, cos(e1,e2)=0 twice
    assert s[0, 2].item() == pytest.approx(-1.0)
    assert s[1, 2].item() == pytest.approx(-0.5)
    assert s[0, 0].item() == pytest.approx(1.0)


def test_streaming_equals_brute_force_on_random_inputs():
    torch.manual_seed(0)
    acc = SimilarityAccumulator(num_layers=2, num_langs=2, hidden=16)
    data = {0: [torch.randn(37, 16) * 3 + 1, torch.randn(53, 16)], 1: [torch.randn(37, 16), torch.randn(53, 16) + 2]}
    for layer, (a, b) in data.items():
        for chunk in range(0, 37, 10):  # streaming in uneven batches
            acc.add(layer, a[chunk : chunk + 10], torch.zeros(len(a[chunk : chunk + 10]), dtype=torch.long))
        acc.add(layer, b, torch.ones(53, dtype=torch.long))
    acc.count(torch.tensor([0] * 37 + [1] * 53))
    matrix = acc.matrix()
    for layer, (a, b) in data.items():
        assert matrix[layer, 0, 1].item() == pytest.approx(brute_force_similarity(a, b), abs=1e-6)
        assert matrix[layer, 1, 1].item() == pytest.approx(brute_force_similarity(b, b), abs=1e-6)


def test_pairs_are_new_first_and_scores_follow_eq9():
    new_new, new_old = pair_names(["en", "de"], ["ru", "fr", "el"])
    assert new_new == [("ru", "fr"), ("ru", "el"), ("fr", "el")]
    assert new_old == [("ru", "en"), ("ru", "de"), ("fr", "en"), ("fr", "de"), ("el", "en"), ("el", "de")]
    pairs = {"ru&fr": [0.6], "ru&en": [0.2], "ru&de": [0.4], "fr&en": [0.1], "fr&de": [0.3]}
    scores, _ = layer_scores(pairs, ["en", "de"], ["ru", "fr"])
    assert scores == [pytest.approx(0.5 * (0.6 + 0.25))]
    scores, rule = layer_scores({"ru&en": [0.2, 0.1]}, ["en"], ["ru"])
    assert scores == [0.2, 0.1] and rule == SCORE_RULE_SINGLE_NEW
    with pytest.raises(ValueError, match=r"pairs \['ru&de'\] are missing"):
        layer_scores({"ru&en": [0.2]}, ["en", "de"], ["ru"])


@pytest.fixture(scope="module")
def profiled(tiny_base, corpus_dir):
    from layermoe_ds.data.streams import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.hf.load import load_causal_lm

    tokenizer = load_tokenizer(tiny_base)
    streams = open_streams(corpus_dir, tokenizer, tiny_base, ["en", "de", "ru", "el"], "valid")
    batches = profile_blocks(streams, 700, 64, tokenizer.pad_token_id)
    model = load_causal_lm(tiny_base)
    return model, batches


def test_profile_counts_exactly_the_first_t_tokens_without_padding(profiled):
    model, batches = profiled
    assert batches.tokens == {"en": 700, "de": 700, "ru": 700, "el": 700}
    assert int(batches.mask_BL.sum()) == 2800 and batches.mask_BL.shape[1] == 64
    acc = profile_model(model, batches, batch_size=4)
    assert acc.counts_A.tolist() == [700.0] * 4


def test_profile_hook_sees_the_post_attention_norm_output(profiled):
    model, batches = profiled
    acc = profile_model(model, batches, batch_size=64)
    # The same sums from the post-attention RMSNorm's output, collected independently.
    layer = model.model.layers[1]
    seen = []
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(input_ids=batches.input_ids_BL, attention_mask=batches.mask_BL)
    handle.remove()
    keep = batches.mask_BL.bool()
    lang = batches.lang_B[:, None].expand_as(keep)[keep]
    twin = SimilarityAccumulator(1, 4, model.config.hidden_size)
    twin.add(0, seen[0][keep], lang)
    assert torch.allclose(acc.sums_NAH[1], twin.sums_NAH[0], atol=1e-6)


def test_profile_is_invariant_to_batch_size(profiled):
    model, batches = profiled
    a = profile_model(model, batches, batch_size=3).matrix()
    b = profile_model(model, batches, batch_size=16).matrix()
    assert torch.allclose(a, b, atol=1e-6)


def _profile_rank(rank: int, world: int, port: int, model_dir: str, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from layermoe_ds.data.streams import open_streams
    from layermoe_ds.data.tokenizer import load_tokenizer
    from layermoe_ds.hf.load import load_causal_lm

    tokenizer = load_tokenizer(model_dir)
    streams = open_streams(data_dir, tokenizer, model_dir, ["en", "de", "ru", "el"], "valid")
    batches = profile_blocks(streams, 700, 64, tokenizer.pad_token_id)
    acc = profile_model(load_causal_lm(model_dir), batches, batch_size=4, rank=rank, world_size=world)
    if rank == 0:
        torch.save(acc.matrix(), out)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_give_the_single_process_result(profiled, tiny_base, corpus_dir, tmp_path):
    from tests.helpers import free_port

    model, batches = profiled
    single = profile_model(model, batches, batch_size=4).matrix()
    out = tmp_path / "matrix.pt"
    mp.spawn(_profile_rank, args=(2, free_port(), str(tiny_base), str(corpus_dir), str(out)), nprocs=2)
    assert torch.allclose(torch.load(out), single, atol=1e-6)


def test_profile_command_writes_the_schema(tiny_base, corpus_dir, tmp_path, capsys):
    from layermoe_ds.cli import main

    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    profile = ["profile", "--model", str(tiny_base), "--data", str(corpus_dir), "--old", "en,de", "--new", "ru,fr,el"]
    assert main([*profile, "--tokens-per-lang", "500", "--seq-len", "64", "--out", str(out), "--plot", str(plot)]) == 0
    sim = json.loads(out.read_text())
    assert sim["num_layers"] == 3 and sim["old"] == ["en", "de"] and sim["new"] == ["ru", "fr", "el"]
    assert list(sim["pairs"]) == ["ru&fr", "ru&el", "fr&el", "ru&en", "ru&de", "fr&en", "fr&de", "el&en", "el&de"]
    assert sim["tokens"] == {lang: 500 for lang in ["en", "de", "ru", "fr", "el"]}
    assert all(len(curve) == 3 for curve in sim["pairs"].values()) and len(sim["layer_score"]) == 3
    assert isinstance(sim["seed"], int) and plot.stat().st_size > 10_000
    recomputed, _ = layer_scores(sim["pairs"], sim["old"], sim["new"])
    assert recomputed == pytest.approx(sim["layer_score"])


def test_profile_errors(tiny_base, corpus_dir, tmp_path, capsys):
    from layermoe_ds.cli import main

    base = ["profile", "--model", str(tiny_base), "--data", str(corpus_dir), "--out", str(tmp_path / "s.json")]
    assert main([*base, "--old", "en", "--new", "xx"]) == 2
    assert "['xx'] not found" in capsys.readouterr().err
    assert main([*base, "--old", "en", "--new", "en"]) == 2
    assert "['en'] are in both --old and --new" in capsys.readouterr().err
    assert main([*base, "--old", "en,en", "--new", "ru"]) == 2
    assert "profile.old: lists a language twice: ['en', 'en']" in capsys.readouterr().err
    assert main([*base, "--new", "ru"]) == 2  # before any work: the required field named
    assert "profile.old: required (give it as --old or in --config)" in capsys.readouterr().err
    assert main([*base, "--old", "en", "--new", "ru", "--tokens-per-lang", "10000000", "--strict"]) == 2
    assert "fewer tokens than --tokens-per-lang" in capsys.readouterr().err
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert (
        main(
            [
                "profile",
                "--model",
                str(empty),
                "--data",
                str(corpus_dir),
                "--old",
                "en",
                "--new",
                "ru",
                "--out",
                str(tmp_path / "s.json"),
            ]
        )
        == 2
    )
    assert "has no weights" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.distributed
def test_torchrun_profile_launcher_matches_single_process(tiny_base, corpus_dir, tmp_path):
    import contextlib
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    from tests.helpers import free_port, launch_env

    common = ["--model", str(tiny_base), "--data", str(corpus_dir), "--old", "en,de", "--new", "ru,el"]
    common += ["--tokens-per-lang", "400", "--seq-len", "64", "--batch-size", "2"]
    root = Path(__file__).resolve().parents[1]
    env = launch_env()

    def torchrun():
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        script = [str(root / "launchers" / "profile_similarity.py"), *common, "--out", str(tmp_path / "two.json")]
        return [*launcher, "--master_port", str(free_port()), *script]

    # The fault matrix's profile case: SIGKILL the whole job at a random moment while the ranks run; no partial
    # similarity.json may be left (atomic write), and the rerun gives the full result.
    killed = subprocess.Popen(torchrun(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(psutil.Process(killed.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(4).uniform(0.5, 3.0))
    # torchrun starts its workers in their own sessions: kill the whole tree, not just the launcher's group.
    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    killed.wait()
    if (tmp_path / "two.json").exists():  # finished before the kill: then it is whole
        json.loads((tmp_path / "two.json").read_text())
        (tmp_path / "two.json").unlink()
    subprocess.run(torchrun(), check=True, env=env, capture_output=True)
    from layermoe_ds.cli import main

    assert main(["profile", *common, "--out", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and one["tokens"] == two["tokens"]
    assert one["layer_score"] == pytest.approx(two["layer_score"], abs=1e-6)


def test_profiling_an_expanded_layermoe_model_works_like_the_dense_one(profiled, tmp_path):
    """The lifelong case: hooks land on LayerMoE blocks; with new experts still copies of the FFN, every layer's
    FFN input (and so the similarity) is the dense model's."""
    from layermoe_ds.modeling.upcycle import upcycle

    model, batches = profiled
    moe = upcycle(model, {"experts_per_layer": [3, 1, 2], "classifier_layers": [0]}).eval()
    dense_matrix = profile_model(model, batches, batch_size=8).matrix()
    moe_matrix = profile_model(moe, batches, batch_size=8).matrix()
    assert torch.allclose(dense_matrix, moe_matrix, atol=1e-5)
