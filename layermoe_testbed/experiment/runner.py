"""Running a preset: profile the base once → per system and seed: allocate → stage 1 → stage 2 (the real `deepspeed`
launcher) → evaluate after each stage; lifelong systems then expand their G1 model to the third group the same way.
Every step goes through `cache.cached`, so a rerun skips what is done and a killed run resumes."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from layermoe_ds.analysis.allocation import AllocationOptions, allocate_from_file
from layermoe_ds.analysis.plots import plot_similarity
from layermoe_ds.analysis.profiling import run_profile
from layermoe_ds.checkpoints.format import checkpoint_root
from layermoe_ds.config import TrainConfig, from_dict, to_dict
from layermoe_ds.data.streams import open_streams
from layermoe_ds.data.tokenizer import load_tokenizer
from layermoe_ds.distributed import device_and_backend
from layermoe_ds.ds.process import RENDEZVOUS, Launcher, cpu_launch_env, run_launcher, stage_command
from layermoe_ds.errors import InputError, StepFailed
from layermoe_ds.eval.evaluate import evaluate_model
from layermoe_ds.hf.load import load_causal_lm
from layermoe_ds.io import read_json, sha256_file, write_json
from layermoe_ds.modeling.types import moe_blocks
from layermoe_ds.modeling.upcycle import grow_dir
from layermoe_ds.settings import ProfileSettings
from layermoe_testbed.experiment.cache import (
    NotFinished,
    cached,
    directory_manifest,
    fingerprint,
    finished_steps_only,
    step_seconds,
)
from layermoe_testbed.experiment.presets import DENSE_BASE, Phase, Preset, RunId, System, SystemMethod
from layermoe_testbed.experiment.report import write_report


def slug(name: str) -> str:
    """A directory name for a run label: "LayerMoE (3/layer) [seed 1]" → "layermoe-3-layer-seed-1"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def launch_stage(
    stage: int, config: TrainConfig, run_dir: Path, ranks: int, port: int, launcher: Launcher = Launcher.DEEPSPEED
) -> None:
    """One training stage through a real launcher (DeepSpeed's, or torchrun), writing `run_dir/model`: on the GPUs
    when there are any (bf16 as the DeepSpeed JSON says, at most `ranks` of them), else on CPU ranks (gloo, fp32)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / f"stage{stage}.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    ds_json = "stage1_zero2.json" if stage == 1 else "stage2.json"
    cpu = device_and_backend()[0] == "cpu"
    if cpu:
        env = cpu_launch_env()
    else:
        ranks = min(ranks, torch.cuda.device_count())
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    cmd = stage_command(stage, config_file, ds_json, ranks, port, cpu, launcher=launcher)
    log_file = run_dir.parent / f"stage{stage}.log"
    with open(log_file, "w") as log:
        status = run_launcher(cmd, env, log)
    if status != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise StepFailed(f"stage {stage} failed (exit {status}); see {log_file}, which ends:\n{tail}")


def parameter_counts(model) -> dict:
    """Total parameters, and those active per token: every expert beyond the top-k a token uses is inactive."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in moe_blocks(model).values():
        ffn = sum(p.numel() for p in block.expert0.parameters())
        inactive += (block.num_experts - min(block.gate.top_k, block.num_experts)) * ffn
    return {"params_total": total, "params_active": total - inactive}


@dataclass(frozen=True)
class Model:
    """A model directory and the fingerprint of what made it."""

    path: Path
    digest: str


@dataclass
class Context:
    """What every run of one experiment shares."""

    preset: Preset
    base: Model
    data: Path
    data_digest: str
    out: Path
    tokenizer: object
    port: int
    launcher: Launcher = Launcher.DEEPSPEED  # how stages start; not part of any fingerprint (same numbers)
    off_domain: Model | None = None  # English from another source (`data off-domain`), read for forgetting
    keep_checkpoints: bool = False  # a finished stage's checkpoints are dropped (its exported model is its product)

    def evaluate_off_domain(self, model: Model, home: Path) -> dict | None:
        """`model` on the off-domain English (when the experiment has it), as group 0."""
        if self.off_domain is None:
            return None
        return self.evaluate(model, home / "eval_off_domain.json", {"en": 0}, data=self.off_domain)

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

    def evaluate(
        self, model: Model, out: Path, groups: dict[str, int], routing: bool = True, data: Model | None = None
    ) -> dict:
        """`model` on the test split of the languages in `groups` (language → group index) of the experiment's
        data, or of `data`; `routing=False`: with classifier routing off (each token routed by its router alone)."""
        preset = self.preset
        data = data or Model(self.data, self.data_digest)

        def produce() -> None:
            streams = open_streams(data.path, self.tokenizer, model.path, list(groups), "test")
            loaded = load_causal_lm(model.path, device=device_and_backend()[0])
            if not routing:
                loaded.set_classifier_routing(False)
            report = evaluate_model(
                loaded, self.tokenizer, streams, groups, preset.seq_len, max_tokens=preset.eval_max_tokens
            )
            write_json(out, {"model": str(model.path), "groups": groups, **report, **parameter_counts(loaded)})

        inputs = {"step": "evaluate", "model": model.digest, "data": data.digest, "groups": groups}
        inputs.update({} if routing else {"classifier_routing": False})
        cached(out, {**inputs, "seq_len": preset.seq_len, "max_tokens": preset.eval_max_tokens}, produce)
        return read_json(out, "evaluation")

    def profile(self, model: Model, old: tuple[str, ...], new: tuple[str, ...], home: Path) -> Model:
        """Layer similarities of `model` (old against new languages): similarity.json (+ .png) in `home`."""
        out, preset = home / "similarity.json", self.preset
        inputs = {"step": "profile", "model": model.digest, "data": self.data_digest, "old": old, "new": new}
        inputs.update(tokens=preset.profile_tokens, seq_len=preset.seq_len)

        def produce() -> None:
            print(f"profiling {model.path} ({preset.profile_tokens} valid tokens per language) …", flush=True)
            settings = ProfileSettings(
                str(model.path),
                str(self.data),
                tuple(old),
                tuple(new),
                str(out),
                preset.profile_tokens,
                str(home / "similarity.png"),
                seq_len=preset.seq_len,
            )
            run_profile(settings)

        return Model(out, cached(out, inputs, produce))

    def allocate(self, system: System, seed: int, similarity: Model, home: Path) -> tuple[Model, dict]:
        out = home / "allocation.json"
        profile = read_json(similarity.path, "similarity")
        options = AllocationOptions(
            budget=round(system.budget_per_layer * len(profile["layer_score"])),
            method=str(system.method),
            classifier_layers=system.classifier_layers,
            min_experts=system.min_experts,
            max_experts=system.max_experts,
            min_score=self.preset.min_score,
            seed=seed,
            focus_layers=system.focus_layers,
            rounding=self.preset.rounding,
        )

        def produce() -> None:
            allocation = allocate_from_file(similarity.path, options)
            write_json(out, allocation)
            plot_similarity(profile, home / "allocation.png", allocation)

        # Options added since a preset's runs were made are fingerprinted only when set: its cached steps stay valid.
        # Uniform's counts do not depend on the rounding: its runs are shared between presets that round otherwise.
        later = {"rounding": "ceil", "focus_layers": None}
        settings = {k: v for k, v in vars(options).items() if k not in later or v != later[k]}
        if system.method == SystemMethod.UNIFORM:
            settings.pop("rounding", None)
        digest = cached(out, {"step": "allocate", "similarity": similarity.digest, "options": settings}, produce)
        return Model(out, digest), read_json(out, "allocation")

    def stage(self, stage: int, run_config: dict, run_dir: Path, upstream: dict, tag: str) -> Model:
        """Train one stage into `run_dir` (resumed if a kill interrupted it); its exported model. The settings are
        validated as a `TrainConfig` here, before any launch, and fingerprinted whole (defaults included)."""
        config = from_dict(TrainConfig, run_config, "train")

        def produce() -> None:
            log = run_dir.parent / f"stage{stage}.log"
            print(f"{tag} stage {stage}: {config.steps} steps (log: {log}) …", flush=True)
            launch_stage(stage, config, run_dir, self.preset.ranks, self.next_port(), self.launcher)

        inputs = {"step": f"stage{stage}", "config": to_dict(config), **upstream, "ranks": self.preset.ranks}
        model = Model(run_dir / "model", cached(run_dir, inputs, produce, resumable=True))
        if not self.keep_checkpoints:  # only for resuming, and 3-9 GB a run on the real base: a sweep fills a disk
            shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
        return model


def grow(model: Model, allocation: Model, out: Path) -> Model:
    def produce() -> None:
        grow_dir(model.path, read_json(allocation.path, "allocation"), out)

    return Model(out, cached(out, {"step": "grow", "model": model.digest, "allocation": allocation.digest}, produce))


@dataclass(frozen=True)
class Stage1:
    """A run's stage-1 model and where it lives, for the stage-2 variants that continue it."""

    model: Model
    allocation: dict | None
    home: Path


def train_stage1(ctx: Context, system: System, run: RunId, home: Path, start: Model, groups: list[list[str]]) -> Stage1:
    """Allocate (MoE systems) and train stage 1 from `start`, teaching the last of `groups`."""
    preset, tag = ctx.preset, f"[{run.label}]"
    config = {**ctx.common(groups, run.seed), "model": str(start.path.resolve()), "steps": preset.stage1_steps}
    config.update(out=str((home / "stage1").resolve()), lr=preset.stage1_lr)
    upstream: dict = {"model": start.digest, "data": ctx.data_digest}
    if system.method == SystemMethod.FULL_FINETUNE:
        config["full_finetune"] = True
        return Stage1(ctx.stage(1, config, home / "stage1", upstream, tag), None, home)
    if run.phase == Phase.G1:  # from the dense base: allocate on its profile, stage 1 upcycles
        similarity = ctx.profile(ctx.base, preset.old, preset.new, ctx.out)
    else:  # lifelong: profile the expanded model on everything it knows against the next group
        known = tuple(lang for group in groups[:-1] for lang in group)
        similarity = ctx.profile(start, known, tuple(groups[-1]), home)
    allocation_file, allocation = ctx.allocate(system, run.seed, similarity, home)
    print(
        f"{tag} experts per layer {allocation['experts_per_layer']} ({allocation['new_experts']} new), "
        f"classifier layers {allocation['classifier_layers']}",
        flush=True,
    )
    if run.phase != Phase.G1:
        start = grow(start, allocation_file, home / "grown")
        config["model"] = str(start.path.resolve())
        upstream["model"] = start.digest
    config["allocation"] = str(allocation_file.path.resolve())
    upstream["allocation"] = allocation_file.digest
    return Stage1(ctx.stage(1, config, home / "stage1", upstream, tag), allocation, home)


def train_and_evaluate(
    ctx: Context,
    system: System,
    run: RunId,
    home: Path,
    start: Model,
    groups: list[list[str]],
    shared: Stage1 | None = None,
) -> tuple[dict, Model, Stage1]:
    """Stage 1 (or `shared`'s, for a stage-2 variant) and stage 2 for MoE systems, teaching the last of `groups`;
    evaluated after each stage."""
    preset, tag = ctx.preset, f"[{run.label}]"
    index = {lang: g for g, members in enumerate(groups) for lang in members}
    first = shared or train_stage1(ctx, system, run, home, start, groups)
    result: dict = {} if first.allocation is None else {"allocation": first.allocation}
    final = first.model
    if system.method != SystemMethod.FULL_FINETUNE:
        config = {**ctx.common(groups, run.seed), "model": str(first.model.path.resolve()), "lr": preset.stage2_lr}
        config.update(
            out=str((home / "stage2").resolve()),
            steps=preset.stage2_steps,
            stage2_docs_per_old_lang=preset.stage2_docs,
            stage2_docs_per_new_lang=preset.stage2_docs,
        )
        config.update(preset.stage2_settings)
        config.update(system.stage2)
        upstream = {"model": first.model.digest, "data": ctx.data_digest}
        final = ctx.stage(2, config, home / "stage2", upstream, tag)
        result["eval_stage1"] = ctx.evaluate(first.model, first.home / "eval_stage1.json", index)
        if preset.router_only_eval and first.allocation["classifier_layers"]:
            result["eval_router_only"] = ctx.evaluate(final, home / "eval_router_only.json", index, routing=False)
    result["eval"] = ctx.evaluate(final, home / "eval.json", index)
    result["model"] = str(final.path)
    result["wall_s"] = (step_seconds(first.home / "stage1") or 0.0) + (step_seconds(home / "stage2") or 0.0)
    return result, final, first


def run_experiment(
    preset: Preset,
    base: Path,
    data: Path,
    out: Path,
    port: int = 29_400,
    launcher: Launcher = Launcher.DEEPSPEED,
    off_domain: Path | None = None,
    keep_checkpoints: bool = False,
    report_only: bool = False,
) -> dict[RunId, dict]:
    """Run (or resume) every system and seed of `preset` from the dense `base` model, each stage started by
    `launcher`; write the report; return the results by run. With `off_domain` (English text from another source,
    `en.test.txt`), the dense base and every system's final model are also read on it. A finished stage's
    checkpoints are removed unless `keep_checkpoints` (its exported model stays). `report_only`: run nothing, write
    the report of the finished runs with this code (beside a run still training, or one stopped)."""
    out.mkdir(parents=True, exist_ok=True)
    base_model = Model(base, fingerprint(directory_manifest(base)))
    other = Model(off_domain, fingerprint(directory_manifest(off_domain))) if off_domain else None
    ctx = Context(
        preset, base_model, data, fingerprint(directory_manifest(data)), out, load_tokenizer(base), port, launcher,
        other, keep_checkpoints,
    )  # fmt: skip
    with finished_steps_only() if report_only else nullcontext():
        try:
            return _run_experiment(ctx)
        except NotFinished as missing:  # the profile or the dense base's evaluation: nothing to report yet
            raise InputError(f"--report-only: {missing} has not finished yet, so there is nothing to report") from None


def _run_experiment(ctx: Context) -> dict[RunId, dict]:
    preset, base_model, out, off_domain = ctx.preset, ctx.base, ctx.out, ctx.off_domain
    groups = [list(preset.old), list(preset.new)]
    first = {lang: g for g, members in enumerate(groups) for lang in members}
    later = {lang: 2 for lang in preset.lifelong}
    ctx.profile(base_model, preset.old, preset.new, out)
    print("evaluating the dense base …", flush=True)
    # The base's weights pinned by content: a base rebuilt elsewhere may differ (pretraining is seeded, but its
    # floating-point sums are not bit-stable across machines), and the report says which one these numbers are of.
    weights = {f.name: sha256_file(f) for f in sorted(base_model.path.glob("*.safetensors"))}
    dense = {"eval": ctx.evaluate(base_model, out / "dense" / "eval.json", first), "base_sha256": weights}
    if off_domain is not None:
        dense["eval_off_domain"] = ctx.evaluate_off_domain(base_model, out / "dense")
    if preset.lifelong:  # the dense base on the third group's languages, for the lifelong table
        dense["eval_later"] = ctx.evaluate(base_model, out / "dense" / "eval_g2.json", later)
    results = {RunId(DENSE_BASE): dense}
    stage1s: dict[tuple[str, int], Stage1] = {}
    # Seed by seed: every system's first seed before any system's second, so a run stopped early (or given part of
    # a machine) has every system to compare, and a later run adds seeds to it.
    order = sorted(
        ((run.seed, i, system, run) for i, system in enumerate(preset.systems) for run in system.runs()),
        key=lambda entry: entry[:2],
    )  # (a stage-2 variant comes after its source system's run of the same seed, as in the preset)
    for _, _, system, run in order:
        home = out / "systems" / slug(run.label)
        shared = stage1s.get((system.stage1_of, run.seed)) if system.stage1_of else None
        try:  # NotFinished comes only with --report-only: that run (or that part of it) is left out of the report
            results[run], g1_model, stage1s[(system.name, run.seed)] = train_and_evaluate(
                ctx, system, run, home, base_model, groups, shared
            )
        except NotFinished:
            print(f"[{run.label}] not finished: left out of the report", flush=True)
            continue
        with suppress(NotFinished):
            if off_domain is not None:
                results[run]["eval_off_domain"] = ctx.evaluate_off_domain(g1_model, home)
            if system.lifelong and preset.lifelong:
                results[run]["eval_later"] = ctx.evaluate(g1_model, home / "eval_g2.json", later)
                g2 = RunId(run.system, run.seed, Phase.G2)
                results[g2], _, _ = train_and_evaluate(
                    ctx, system, g2, home / "lifelong", g1_model, [*groups, list(preset.lifelong)]
                )
                results[g2]["new_experts_total"] = (
                    results[run]["allocation"]["new_experts"] + results[g2]["allocation"]["new_experts"]
                )
        # The report so far, after every run: an experiment stopped part-way (or still running) has the report of
        # what finished, and a rerun of a finished one (every step a cache hit) rewrites it with the current code.
        write_report(in_preset_order(results, preset), preset, out)
    results = in_preset_order(results, preset)
    if not order:
        write_report(results, preset, out)
    return results


def in_preset_order(results: dict[RunId, dict], preset: Preset) -> dict[RunId, dict]:
    """The systems in the preset's order, each system's runs together (G1, then its expansion)."""
    listed = [RunId(DENSE_BASE)] + [
        key
        for system in preset.systems
        for run in system.runs()
        for key in (run, RunId(run.system, run.seed, Phase.G2))
    ]
    return {key: results[key] for key in listed if key in results}
