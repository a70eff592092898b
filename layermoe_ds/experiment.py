"""`layermoe experiment`: several systems on the same data and token budget, one report.

Steps: profile the base model once → per system: allocate → stage 1 → stage 2 (the real `deepspeed` launcher,
2 CPU ranks) → evaluate after each stage; the dense base is evaluated once. Every finished step is cached in the
run directory (a rerun skips it; a killed training step resumes from its newest complete checkpoint), so the whole
experiment is resumable. `report.md` (+ `results.json`, plots) is rewritten at the end from what is on disk.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from layermoe_ds.distributed import RENDEZVOUS, cpu_launch_env, device_and_backend
from layermoe_ds.io import atomic_write_text, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class System:
    """One row: how its experts are allocated; everything else (data, steps, learning rates) is the preset's."""

    name: str
    method: str  # "layermoe" (Eq. 10), "uniform" (MoE-LPR), "random", or FULL_FINETUNE (dense, no experts)
    budget_per_layer: float = 0.0  # total experts (incl. expert 0) = round(this × layers)
    classifier_layers: str = "0"  # allocate's --classifier-layers: "K", "last-K", "0" (none)
    min_experts: int = 1
    max_experts: int | None = None
    seed: int = 0  # training seed (data order, router initialisation, random allocation)
    lifelong: bool = False  # then expand again to the preset's third language group, allocated the same way

    @property
    def label(self) -> str:
        return self.name if self.seed == 0 else f"{self.name}{SEED_TAG}{self.seed}]"


SEED_TAG = " [seed "  # a row label's seed suffix: "LayerMoE [seed 1]"


def seed_family(label: str) -> str:
    """The system a row label belongs to, without its seed suffix."""
    return label.split(SEED_TAG)[0]


FULL_FINETUNE = "full-finetune"


@dataclass(frozen=True)
class Preset:
    systems: tuple[System, ...]
    old: tuple[str, ...] = ("en", "de")
    new: tuple[str, ...] = ("fr", "ru", "el")
    lifelong: tuple[str, ...] = ()  # the third group (G2) that `lifelong` systems expand to after G1
    profile_tokens: int = 20_000
    min_score: float | None = 0.01  # a toy model's layer-0 similarity can be ≤ 0 (README, honest limitations)
    seq_len: int = 128
    stage1_steps: int = 150
    stage1_lr: float = 2e-3
    stage2_steps: int = 60
    stage2_lr: float = 1e-2
    stage2_docs: int = 3000
    eval_max_tokens: int | None = None  # per language; None = the whole test split
    ranks: int = 2
    extra_train: dict = field(default_factory=dict)

    @property
    def langs(self) -> tuple[str, ...]:
        return (*self.old, *self.new, *self.lifelong)


# 4-layer demo model: uniform MoE-LPR with 4 experts per layer (12 new) against LayerMoE at a budget of 2.5 per
# layer (10: 6 new, half as many), at least 2 per layer as in the paper's allocations (so the classifier layers,
# the most similar ones, have a router to steer) and at most 4 (the tiny model's layer-0 similarity is near zero,
# and Eq. 10's 1/T_i would give it everything).
UNIFORM = System("MoE-LPR uniform (4/layer)", "uniform", 4, "0", min_experts=4, max_experts=4)
LAYERMOE = System("LayerMoE", "layermoe", 2.5, "2", min_experts=2, max_experts=4)
DENSE_FINETUNE = System("Dense full fine-tune", FULL_FINETUNE)
SEEDS = (1, 2)  # extra training seeds of the two main systems in the full preset (seed 0 is the main row)
PRESETS = {
    # make demo: the dense base, MoE-LPR's uniform allocation, LayerMoE with half the new experts.
    "demo": Preset(systems=(UNIFORM, LAYERMOE)),
    # plus: the forgetting baseline; the ablations (random allocation at LayerMoE's budget, no classifier,
    # classifiers on the last layers); the lifelong G0 → G1 → G2 expansion of both; more seeds of both.
    "full": Preset(
        systems=(
            replace(UNIFORM, lifelong=True),
            replace(LAYERMOE, lifelong=True),
            DENSE_FINETUNE,
            replace(LAYERMOE, name="LayerMoE w/ random allocation", method="random"),
            replace(LAYERMOE, name="LayerMoE w/o classifier", classifier_layers="0"),
            replace(LAYERMOE, name="LayerMoE, classifier on last-2 layers", classifier_layers="last-2"),
            *(replace(system, seed=seed) for seed in SEEDS for system in (UNIFORM, LAYERMOE)),
        ),
        lifelong=("es", "it"),
    ),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def launch_stage(stage: int, run_config: dict, run_dir: Path, ranks: int, port: int) -> Path:
    """One training stage through the real DeepSpeed launcher, skipped when its model is exported: on the GPUs
    when there are any (bf16 as the DeepSpeed JSON says, at most `ranks` of them), else on CPU ranks (gloo, fp32)."""
    import yaml

    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / f"stage{stage}.yaml"
    config_file.write_text(yaml.safe_dump(run_config))
    ds_json = "stage1_zero2.json" if stage == 1 else "stage2.json"
    configs = [str(ROOT / "ds_configs" / ds_json)]
    if device_and_backend()[0] == "cpu":
        configs.append(str(ROOT / "ds_configs" / "cpu.json"))
        env = cpu_launch_env()
    else:
        import torch

        ranks = min(ranks, torch.cuda.device_count())
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port)]
    cmd += [str(ROOT / "launchers" / f"stage{stage}.py"), "--config", str(config_file), "--deepspeed_config"]
    cmd += configs
    log_file = run_dir.parent / f"stage{stage}.log"
    with open(log_file, "w") as log:
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"stage {stage} failed (exit {result.returncode}); see {log_file}, which ends:\n{tail}")
    return run_dir / "model"


def timed(timing_file: Path, step: str, fn, *args):
    """`fn(*args)`, recording its wall time under `step` the first time (a cached rerun keeps the first time)."""
    timing = read_json(timing_file, "timing") if timing_file.is_file() else {}
    started = time.perf_counter()
    result = fn(*args)
    if step not in timing:
        timing[step] = round(time.perf_counter() - started, 1)
        write_json(timing_file, timing)
    return result


def evaluate_cached(model_dir: Path, out: Path, groups: dict[str, int], preset: Preset, data: Path, tokenizer) -> dict:
    """Evaluate `model_dir` on the test split of the languages in `groups` (language → group), once."""
    from layermoe_ds.data.prepare import open_streams
    from layermoe_ds.eval.evaluate import evaluate_model
    from layermoe_ds.modeling.hf_loading import load_causal_lm

    if out.is_file():
        return read_json(out, "evaluation")
    streams = open_streams(data, tokenizer, model_dir, list(groups), "test")
    model = load_causal_lm(model_dir, device=device_and_backend()[0])
    report = evaluate_model(model, tokenizer, streams, groups, preset.seq_len, max_tokens=preset.eval_max_tokens)
    report = {"model": str(model_dir), "groups": groups, **report, **parameter_counts(model)}
    write_json(out, report)
    return report


def parameter_counts(model) -> dict:
    """Total parameters, and those active per token: every expert beyond the top-k a token uses is inactive."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if hasattr(model, "moe_blocks"):
        for block in model.moe_blocks().values():
            ffn = sum(p.numel() for p in block.base_ffn.parameters())
            inactive += (block.num_experts - min(block.gate.top_k, block.num_experts)) * ffn
    return {"params_total": total, "params_active": total - inactive}


@dataclass
class Context:
    """What every system of one experiment shares."""

    preset: Preset
    base: Path
    data: Path
    out: Path
    tokenizer: object
    port: int

    def next_port(self) -> int:  # a fresh rendezvous port per launch: a killed run's port may linger
        self.port += 1
        return self.port

    def common(self, groups: list[list[str]], seed: int) -> dict:
        return {
            "data": str(self.data.resolve()),
            "language_groups": [list(g) for g in groups],
            "seq_len": self.preset.seq_len,
            "save_every": 50,
            "log_every": 25,
            "seed": seed,
            **self.preset.extra_train,
        }


def profile_cached(ctx: Context, model: Path, old: tuple[str, ...], new: tuple[str, ...], home: Path) -> Path:
    from layermoe_ds.analysis.profiling import run_profile

    similarity = home / "similarity.json"
    if not similarity.is_file():
        print(f"profiling {model} ({ctx.preset.profile_tokens} valid tokens per language) …", flush=True)
        args = (model, ctx.data, old, new, ctx.preset.profile_tokens, similarity)
        timed(home / "timing.json", "profile", lambda: run_profile(
            *args, plot=home / "similarity.png", seq_len=ctx.preset.seq_len
        ))  # fmt: skip
    return similarity


def allocate_cached(ctx: Context, system: System, similarity: Path, home: Path) -> tuple[Path, dict]:
    from layermoe_ds.analysis.allocation import AllocationOptions, allocate_from_file
    from layermoe_ds.analysis.plots import plot_similarity

    allocation_file = home / "allocation.json"
    if not allocation_file.is_file():
        profile = read_json(similarity, "similarity")
        options = AllocationOptions(
            budget=round(system.budget_per_layer * len(profile["layer_score"])),
            method=system.method,
            classifier_layers=system.classifier_layers,
            min_experts=system.min_experts,
            max_experts=system.max_experts,
            min_score=ctx.preset.min_score,
            seed=system.seed,
        )
        allocation = allocate_from_file(similarity, options)
        write_json(allocation_file, allocation)
        plot_similarity(profile, home / "allocation.png", allocation)
    return allocation_file, read_json(allocation_file, "allocation")


def train_and_evaluate(ctx: Context, system: System, home: Path, model: Path, groups: list[list[str]]) -> dict:
    """Stage 1 (+ stage 2 for MoE systems) from `model`, teaching the last of `groups`; evaluated after each."""
    preset, timing, tag = ctx.preset, home / "timing.json", f"[{system.label}{' → G2' if len(groups) > 2 else ''}]"
    index = {lang: g for g, members in enumerate(groups) for lang in members}
    stage1_config = {**ctx.common(groups, system.seed), "model": str(model.resolve()), "steps": preset.stage1_steps}
    stage1_config.update(out=str((home / "stage1").resolve()), lr=preset.stage1_lr)
    result: dict = {}
    if system.method == FULL_FINETUNE:
        stage1_config["full_finetune"] = True
    else:
        if len(groups) == 2:  # from the dense base: allocate on its profile, stage 1 upcycles
            similarity = profile_cached(ctx, ctx.base, preset.old, preset.new, ctx.out)
        else:  # lifelong: profile the expanded model on everything it knows against the next group
            known = tuple(lang for group in groups[:-1] for lang in group)
            similarity = profile_cached(ctx, model, known, tuple(groups[-1]), home)
        allocation_file, result["allocation"] = allocate_cached(ctx, system, similarity, home)
        allocation = result["allocation"]
        print(
            f"{tag} experts per layer {allocation['experts_per_layer']} ({allocation['new_experts']} new), "
            f"classifier layers {allocation['classifier_layers']}",
            flush=True,
        )
        if len(groups) > 2:
            model = grow_cached(model, allocation, home / "grown")
            stage1_config["model"] = str(model.resolve())
        stage1_config["allocation"] = str(allocation_file.resolve())
    print(f"{tag} stage 1: {preset.stage1_steps} steps (log: {home / 'stage1.log'}) …", flush=True)
    final = timed(timing, "stage1", launch_stage, 1, stage1_config, home / "stage1", preset.ranks, ctx.next_port())
    if system.method != FULL_FINETUNE:
        stage2_config = {**ctx.common(groups, system.seed), "model": str(final.resolve()), "lr": preset.stage2_lr}
        stage2_config.update(
            out=str((home / "stage2").resolve()),
            steps=preset.stage2_steps,
            stage2_docs_per_old_lang=preset.stage2_docs,
            stage2_docs_per_new_lang=preset.stage2_docs,
        )
        print(f"{tag} stage 2: {preset.stage2_steps} steps (log: {home / 'stage2.log'}) …", flush=True)
        stage1 = final
        final = timed(timing, "stage2", launch_stage, 2, stage2_config, home / "stage2", preset.ranks, ctx.next_port())
        result["eval_stage1"] = evaluate_cached(
            stage1, home / "eval_stage1.json", index, preset, ctx.data, ctx.tokenizer
        )
    print(f"{tag} evaluating …", flush=True)
    result["eval"] = evaluate_cached(final, home / "eval.json", index, preset, ctx.data, ctx.tokenizer)
    result["model"] = str(final)
    result["wall_s"] = sum(v for k, v in read_json(timing, "timing").items() if k.startswith("stage"))
    return result


def grow_cached(model: Path, allocation: dict, out: Path) -> Path:
    from layermoe_ds.modeling.upcycle import grow_dir

    if not (out / "config.json").is_file():
        grow_dir(model, allocation, out)
    return out


def run_experiment(preset: Preset, base: Path, data: Path, out: Path, port: int = 29_400) -> dict:
    """Run (or resume) every system of `preset` from the dense `base` model; write the report; return results."""
    from layermoe_ds.data.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(preset, base, data, out, load_tokenizer(base), port)
    groups = [list(preset.old), list(preset.new)]
    first = {lang: g for g, members in enumerate(groups) for lang in members}
    profile_cached(ctx, base, preset.old, preset.new, out)
    print("evaluating the dense base …", flush=True)
    results = {
        "dense base": {"eval": evaluate_cached(base, out / "dense" / "eval.json", first, preset, data, ctx.tokenizer)}
    }
    lifelong: dict = {}
    if preset.lifelong:  # the dense base on the third group's languages, for the lifelong table
        later = {lang: 1 for lang in preset.lifelong}
        lifelong["dense base"] = merge_evals(
            results["dense base"]["eval"],
            evaluate_cached(base, out / "dense" / "eval_g2.json", later, preset, data, ctx.tokenizer),
        )
    for system in preset.systems:
        home = out / "systems" / slug(system.label)
        home.mkdir(parents=True, exist_ok=True)
        g1 = results[system.label] = train_and_evaluate(ctx, system, home, base, groups)
        if system.lifelong and preset.lifelong:
            g1_model, g1_experts = Path(g1["model"]), g1["allocation"]["new_experts"]
            g2_langs = evaluate_cached(g1_model, home / "eval_g2.json", later, preset, data, ctx.tokenizer)
            lifelong[f"{system.label} after G1"] = {**merge_evals(g1["eval"], g2_langs), "new_experts": g1_experts}
            expanded = train_and_evaluate(ctx, system, home / "lifelong", g1_model, [*groups, list(preset.lifelong)])
            g2_experts = g1_experts + expanded["allocation"]["new_experts"]
            lifelong[f"{system.label} after G2"] = {**expanded["eval"], "new_experts": g2_experts}
    write_json(out / "results.json", {"systems": results, "lifelong": lifelong})
    write_report(results, preset, out, lifelong)
    return results


def merge_evals(*reports: dict) -> dict:
    """One evaluation's languages, from several evaluations of the same model on disjoint languages."""
    merged = {**reports[0], "languages": {}}
    for report in reports:
        merged["languages"].update(report["languages"])
    return merged


# --- the report ---------------------------------------------------------------------------------------------------


def _row(name: str, result: dict, dense: dict, preset: Preset) -> str:
    ev = result["eval"]
    langs = [*preset.old, *preset.new]
    new_experts = result.get("allocation", {}).get("new_experts", 0)
    cells = [name, str(new_experts), f"{ev['params_total'] / 1e6:.2f}M", f"{ev['params_active'] / 1e6:.2f}M"]
    cells += [f"{ev['languages'][lang]['bpb']:.3f}" for lang in langs]
    cells += [f"{ev['old_avg']['bpb']:.3f}", f"{ev['new_avg']['bpb']:.3f}"]
    cells += [
        f"{ev['old_avg']['bpb'] - dense['old_avg']['bpb']:+.3f}",
        f"{ev['new_avg']['bpb'] - dense['new_avg']['bpb']:+.3f}",
    ]
    stage1 = result.get("eval_stage1")
    cells += [f"{stage1['old_avg']['bpb']:.3f}" if stage1 else "-"]
    cells += [f"{result['wall_s']:.0f}" if "wall_s" in result else "-"]
    return "| " + " | ".join(cells) + " |"


def compare(ours: float, theirs: float, tolerance: float = 0.01) -> str:
    """'better', 'matched' (within `tolerance` relative) or 'worse', for a lower-is-better number."""
    if ours < theirs * (1 - tolerance):
        return "better"
    return "matched" if ours <= theirs * (1 + tolerance) else "worse"


def reading(results: dict, preset: Preset) -> list[str]:
    """The paper's claims checked against these numbers: each line says whether it replicated here."""
    dense = results["dense base"]["eval"]
    lines = []
    uniform = next((r for n, r in results.items() if r.get("allocation", {}).get("method") == "uniform"), None)
    layermoe = results.get(LAYERMOE.name)
    if uniform and layermoe:
        fewer = 1 - layermoe["allocation"]["new_experts"] / uniform["allocation"]["new_experts"]
        u, lm = uniform["eval"], layermoe["eval"]
        # "As good" = no worse than uniform by more than 1% relative on either average (the paper's claim is
        # comparable-or-better at fewer experts, not a strict win on every number).
        verdicts = {group: compare(lm[f"{group}_avg"]["bpb"], u[f"{group}_avg"]["bpb"]) for group in ("new", "old")}
        replicated = all(v != "worse" for v in verdicts.values())
        lines.append(
            f"- *Fewer experts, as good* (LayerMoE with {fewer:.0%} fewer new experts vs uniform MoE-LPR): New-avg "
            f"{lm['new_avg']['bpb']:.3f} vs {u['new_avg']['bpb']:.3f} bits/byte ({verdicts['new']}), Old-avg "
            f"{lm['old_avg']['bpb']:.3f} vs {u['old_avg']['bpb']:.3f} ({verdicts['old']}) — "
            + ("replicated." if replicated else "not replicated here.")
        )
    for name, result in results.items():
        if "eval_stage1" not in result:
            continue
        s1, s2 = result["eval_stage1"]["old_avg"]["bpb"], result["eval"]["old_avg"]["bpb"]
        lines.append(
            f"- *Stage 2 restores old languages* ({name}): Old-avg {s1:.3f} after stage 1 → {s2:.3f} after stage 2 "
            f"(dense {dense['old_avg']['bpb']:.3f}) — " + ("replicated." if s2 <= s1 else "not replicated here.")
        )
    ablations = (  # (claim, the ablated system, the average it should lose on)
        ("The classifier protects old languages", "LayerMoE w/o classifier", "old"),
        ("Classifiers on the most similar layers beat the last layers", "LayerMoE, classifier on last-2 layers", "old"),
        ("Similarity-based allocation beats random at equal budget", "LayerMoE w/ random allocation", "new"),
    )
    for claim, other_name, group in ablations:
        other = results.get(other_name)
        if not (layermoe and other):
            continue
        ours, theirs = layermoe["eval"][f"{group}_avg"]["bpb"], other["eval"][f"{group}_avg"]["bpb"]
        text = f"- *{claim}*: {group.capitalize()}-avg {ours:.3f} (LayerMoE) vs {theirs:.3f} ({other_name}) — "
        keys = ("experts_per_layer", "classifier_layers")
        if all(layermoe["allocation"][k] == other["allocation"][k] for k in keys):  # e.g. the most similar layers
            # are the last ones: the "ablation" builds the same model
            layers = layermoe["allocation"]["classifier_layers"]
            lines.append(text + f"not testable on this model: both put the same experts and classifiers ({layers}).")
            continue
        verdict = compare(ours, theirs)
        lines.append(
            text
            + {
                "better": "replicated.",
                "matched": "no difference beyond 1% here.",
                "worse": "not replicated here.",
            }[verdict]
        )
    finetuned = results.get(DENSE_FINETUNE.name)
    if layermoe and finetuned:
        base_old = dense["old_avg"]["bpb"]
        ft, lm = finetuned["eval"], layermoe["eval"]
        lines.append(
            f"- *Dense fine-tuning forgets, LayerMoE does not*: Old-avg {base_old:.3f} (dense base) → "
            f"{ft['old_avg']['bpb']:.3f} after full fine-tuning ({ft['old_avg']['bpb'] - base_old:+.3f}) vs "
            f"{lm['old_avg']['bpb']:.3f} with LayerMoE ({lm['old_avg']['bpb'] - base_old:+.3f}); New-avg "
            f"{ft['new_avg']['bpb']:.3f} vs {lm['new_avg']['bpb']:.3f} — "
            + ("replicated." if ft["old_avg"]["bpb"] > lm["old_avg"]["bpb"] else "not replicated here.")
        )
    return lines


def group_means(languages: dict, groups: list[tuple[str, ...]]) -> list[float | None]:
    """Plain mean bits per byte over each group's languages (None where a group was not evaluated)."""
    means = []
    for group in groups:
        values = [languages[lang]["bpb"] for lang in group if lang in languages]
        means.append(sum(values) / len(values) if len(values) == len(group) else None)
    return means


def lifelong_reading(lifelong: dict, preset: Preset) -> list[str]:
    """The lifelong claims: earlier groups survive the next expansion, and LayerMoE needs fewer experts for it."""
    groups = [preset.old, preset.new, preset.lifelong]
    lines, after_g2 = [], {}
    for name, ev in lifelong.items():
        if not name.endswith(" after G2"):
            continue
        system = name[: -len(" after G2")]
        before = group_means(lifelong[f"{system} after G1"]["languages"], groups)
        after = group_means(ev["languages"], groups)
        after_g2[system] = (after, ev["new_experts"])
        kept = after[0] <= before[0] * 1.01 and after[1] <= before[1] * 1.01
        lines.append(
            f"- *Lifelong expansion keeps earlier groups* ({system}): G0-avg {before[0]:.3f} → {after[0]:.3f}, "
            f"G1-avg {before[1]:.3f} → {after[1]:.3f}, G2-avg {before[2]:.3f} → {after[2]:.3f} — "
            + ("replicated (within 1%)." if kept else "not replicated here.")
        )
    uniform = after_g2.get(UNIFORM.name)
    layermoe = after_g2.get(LAYERMOE.name)
    if uniform and layermoe:
        (lm, lm_experts), (u, u_experts) = layermoe, uniform
        verdicts = [compare(a, b) for a, b in zip(lm, u, strict=True)]
        lines.append(
            f"- *Lifelong, fewer experts, as good* (LayerMoE {lm_experts} new experts in total vs uniform "
            f"{u_experts}): G0/G1/G2-avg {lm[0]:.3f}/{lm[1]:.3f}/{lm[2]:.3f} vs {u[0]:.3f}/{u[1]:.3f}/{u[2]:.3f} "
            f"({'/'.join(verdicts)}) — " + ("replicated." if "worse" not in verdicts else "not replicated here.")
        )
    return lines


def seed_spread(results: dict) -> dict[str, dict]:
    """System name → {seeds, old/new mean and sample standard deviation} for systems run with several seeds."""
    by_name: dict[str, list[dict]] = {}
    for label, result in results.items():
        by_name.setdefault(seed_family(label), []).append(result["eval"])
    spread = {}
    for name, evals in by_name.items():
        if len(evals) < 2:
            continue
        entry = {"seeds": len(evals)}
        for group in ("old", "new"):
            values = [ev[f"{group}_avg"]["bpb"] for ev in evals]
            entry[group] = (statistics.mean(values), statistics.stdev(values))
        spread[name] = entry
    return spread


def seed_reading(spread: dict) -> list[str]:
    uniform = spread.get(UNIFORM.name)
    layermoe = spread.get(LAYERMOE.name)
    if not (uniform and layermoe):
        return []
    lines = []
    for group in ("new", "old"):
        gap = layermoe[group][0] - uniform[group][0]
        noise = max(layermoe[group][1], uniform[group][1])
        lines.append(
            f"- *Over {layermoe['seeds']} seeds* ({group.capitalize()}-avg): LayerMoE − uniform = {gap:+.3f} bits/byte "
            f"against a seed spread (sd) of up to {noise:.3f} — "
            + ("a difference beyond the seed noise." if abs(gap) > 2 * noise else "within the seed noise.")
        )
    return lines


def write_report(results: dict, preset: Preset, out: Path, lifelong: dict | None = None) -> Path:
    langs = [*preset.old, *preset.new]
    dense = results["dense base"]["eval"]
    header = ["system", "new experts", "params", "active"] + [f"{lang} bpb" for lang in langs]
    header += ["Old-avg", "New-avg", "Δ Old vs dense", "Δ New vs dense", "Old-avg after stage 1", "wall s"]
    lines = [
        "# LayerMoE experiment report",
        "",
        f"Old languages {', '.join(preset.old)}; new {', '.join(preset.new)}. Held-out test split, bits per byte "
        "(lower is better). Every system: the same data, stage-1 and stage-2 steps and learning rates "
        f"(stage 1 {preset.stage1_steps} steps, stage 2 {preset.stage2_steps}); wall time = both training stages "
        "on 2 CPU ranks.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += [_row(name, result, dense, preset) for name, result in results.items()]
    spread = seed_spread(results)
    if spread:
        lines += ["", "## Seeds", "", "| system | seeds | Old-avg mean ± sd | New-avg mean ± sd |", "|---|---|---|---|"]
        for name, entry in spread.items():
            cells = [f"{entry[g][0]:.3f} ± {entry[g][1]:.3f}" for g in ("old", "new")]
            lines.append(f"| {name} | {entry['seeds']} | {cells[0]} | {cells[1]} |")
    if lifelong:
        lines += ["", *lifelong_table(lifelong, preset)]
    lines += ["", "## Reading", "", *reading(results, preset), *seed_reading(spread)]
    lines += [*lifelong_reading(lifelong or {}, preset), ""]
    lines += ["## Figures", "", "![similarity](similarity.png)", "", "![per-language](per_language.png)", ""]
    lines += ["![routing](routing.png)", ""]
    plot_report(results, preset, out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def lifelong_table(lifelong: dict, preset: Preset) -> list[str]:
    groups = [preset.old, preset.new, preset.lifelong]
    header = ["model", "new experts", *(f"{lang} bpb" for lang in preset.langs), "G0-avg", "G1-avg", "G2-avg"]
    lines = [
        f"## Lifelong expansion: G0 = {','.join(preset.old)} → G1 = {','.join(preset.new)} → "
        f"G2 = {','.join(preset.lifelong)}",
        "",
        "Each system expands again from its G1 model: profile it (G0+G1 against G2), allocate the same way, grow, "
        "stage 1 on G2, stage 2 on all three groups. Bits per byte on the test split; '-' = not evaluated.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, ev in lifelong.items():
        langs = ev["languages"]
        cells = [name, str(ev.get("new_experts", 0))]
        cells += [f"{langs[lang]['bpb']:.3f}" if lang in langs else "-" for lang in preset.langs]
        cells += [f"{m:.3f}" if m is not None else "-" for m in group_means(langs, groups)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_report(results: dict, preset: Preset, out: Path) -> None:
    from layermoe_ds.analysis.plots import _pyplot

    plt = _pyplot()
    langs = [*preset.old, *preset.new]
    names = list(results)
    fig, ax = plt.subplots(figsize=(1.2 * len(langs) * max(len(names), 2) / 2 + 2, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["eval"]["languages"][lang]["bpb"] for lang in langs]
        ax.bar([x + i * width for x in range(len(langs))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(langs))], langs)
    ax.set_ylabel("bits per byte (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "per_language.png", dpi=120)
    plt.close(fig)

    moe = [n for n in names if "routing" in results[n]["eval"] and seed_family(n) == n]
    if not moe:
        return
    fig, axes = plt.subplots(1, len(moe), figsize=(3.2 * len(moe), 3.2), squeeze=False)
    for ax, name in zip(axes[0], moe, strict=True):
        layers = results[name]["eval"]["routing"]["layers"]
        grid = [[layers[layer]["expert0_share"][lang] for lang in langs] for layer in layers]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(layers)), list(layers))
        ax.set_title(name, fontsize=7)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens → expert 0")
    fig.savefig(out / "routing.png", dpi=120)
    plt.close(fig)


def finite_table(results: dict) -> bool:
    """Every number in the report's rows is finite."""
    for result in results.values():
        for key in ("eval", "eval_stage1"):
            if key in result:
                ev = result[key]
                values = [v["bpb"] for v in ev["languages"].values()] + [ev["old_avg"]["bpb"], ev["new_avg"]["bpb"]]
                if not all(math.isfinite(v) for v in values):
                    return False
    return True
