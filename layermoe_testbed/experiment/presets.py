"""What an experiment runs: systems (how each allocates its experts), the seeds of each, and the shared data and
budget; `RunId` names one training run of one system."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from layermoe_ds.config import StrEnum, TrainConfig
from layermoe_ds.errors import InputError


class SystemMethod(StrEnum):
    LAYERMOE = "layermoe"  # Eq. 10: experts ∝ 1/T_i
    UNIFORM = "uniform"  # MoE-LPR: the same count in every layer
    RANDOM = "random"  # the budget spread at random
    FULL_FINETUNE = "full-finetune"  # the dense model, every parameter trained (no experts): the forgetting baseline
    LEAST_SIMILAR = "least-similar"  # the premise test: the new experts in the `focus_layers` least similar layers
    MOST_SIMILAR = "most-similar"  # … or the most similar ones, every other layer dense


class Phase(StrEnum):
    G1 = "G1"  # expanded from the dense base to the preset's new languages
    G2 = "G2"  # the lifelong expansion of that G1 model to the preset's third group


DENSE_BASE = "dense base"


@dataclass(frozen=True, order=True)
class RunId:
    """One training run: a system, its training seed, and which expansion."""

    system: str
    seed: int = 0
    phase: Phase = Phase.G1

    @property
    def label(self) -> str:
        seed = f" [seed {self.seed}]" if self.seed else ""
        return f"{self.system}{seed}" + (f" → {self.phase}" if self.phase != Phase.G1 else "")

    def as_dict(self) -> dict:
        return {"system": self.system, "seed": self.seed, "phase": str(self.phase)}


@dataclass(frozen=True)
class Claim:
    """What an ablation tests: the reference LayerMoE system should beat the ablated one on `average`."""

    text: str
    average: str  # "old" or "new"


@dataclass(frozen=True)
class System:
    """One row: how its experts are allocated; everything else (data, steps, learning rates) is the preset's."""

    name: str
    method: SystemMethod
    budget_per_layer: float = 0.0  # total experts (incl. expert 0) = round(this × layers)
    classifier_layers: str = "0"  # allocate's --classifier-layers: "K", "last-K", "0" (none)
    min_experts: int = 1
    max_experts: int | None = None
    seeds: tuple[int, ...] = (0,)  # training seeds (data order, router initialisation, random allocation)
    lifelong: bool = False  # then expand again to the preset's third language group, allocated the same way
    curve: bool = False  # a point of its method's budget–quality curve
    ablates: Claim | None = None  # an ablation of the preset's reference system, and the claim it tests
    # A stage-2 variant: stage-2 settings over the preset's, as (TrainConfig key, value) pairs; with `stage1_of`,
    # stage 2 continues that (earlier) system's stage-1 model of the same seed instead of training its own.
    stage2: tuple[tuple[str, object], ...] = ()
    stage1_of: str = ""
    focus_layers: int | None = None  # least-similar / most-similar: how many layers get the new experts

    def runs(self) -> list[RunId]:
        return [RunId(self.name, seed) for seed in self.seeds]


@dataclass(frozen=True)
class Preset:
    systems: tuple[System, ...]
    old: tuple[str, ...] = ("en", "de")
    new: tuple[str, ...] = ("fr", "ru", "el")
    lifelong: tuple[str, ...] = ()  # the third group (G2) that `lifelong` systems expand to after G1
    # The base-model preset `layermoe demo/experiment` pretrains (testbed/pretrain.py), or "smollm2": the real
    # pretrained base `layermoe real-base` builds (testbed/real_base.py).
    base: str = "demo"
    # The token that ends each document in the base tokenizer's shards (`data tokenize --doc-separator`), when it
    # is not the tokenizer's EOS: an Instruct tokenizer's EOS ends chat turns.
    doc_separator: str | None = None
    reference: str = "LayerMoE"  # the LayerMoE system the headline claim and the ablations are about
    baseline: str = "MoE-LPR uniform (4/layer)"  # the uniform MoE-LPR system it is compared with
    profile_tokens: int = 20_000
    min_score: float | None = 0.01  # a toy model's layer-0 similarity can be ≤ 0 (docs/limitations.md)
    seq_len: int = 128
    stage1_steps: int = 150
    stage1_lr: float = 2e-3
    stage2_steps: int = 60
    stage2_lr: float = 1e-2
    stage2_docs: int = 3000
    eval_max_tokens: int | None = None  # per language; None = the whole test split
    router_only_eval: bool = False  # also evaluate classifier systems with classifier routing off (router alone)
    ranks: int = 2
    extra_train: dict = field(default_factory=dict)
    # Stage-2 settings for every system (before a system's own `stage2`), as (TrainConfig key, value) pairs.
    stage2_settings: tuple[tuple[str, object], ...] = ()
    # Eq. 10's rounding (`allocate --rounding`): "ceil" as published (the total can exceed the budget), or "exact".
    rounding: str = "ceil"
    # Also read every final model's English on text from another source (`data off-domain`: the Python docs).
    off_domain: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in ("ceil", "exact"):
            raise InputError(f"experiment preset: rounding {self.rounding!r} is not ceil or exact")
        if self.off_domain and "en" not in self.old:
            raise InputError("experiment preset: off_domain reads English (Python docs), so en must be old")
        names = [s.name for s in self.systems]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates or DENSE_BASE in names:
            raise InputError(f"experiment preset: system names must be unique and not {DENSE_BASE!r}: {duplicates}")
        settings = {f.name for f in fields(TrainConfig)}
        unknown = sorted(key for key, _ in self.stage2_settings if key not in settings)
        if unknown:
            raise InputError(f"experiment preset: stage2_settings has unknown settings {unknown}")
        for i, system in enumerate(self.systems):
            unknown = sorted(key for key, _ in system.stage2 if key not in settings)
            if unknown:
                raise InputError(f"experiment preset: {system.name!r} stage2 has unknown settings {unknown}")
            if not system.stage1_of:
                continue
            source = next((s for s in self.systems[:i] if s.name == system.stage1_of), None)
            if source is None or source.stage1_of or not set(system.seeds) <= set(source.seeds):
                raise InputError(
                    f"experiment preset: {system.name!r} continues {system.stage1_of!r}, which must be an earlier "
                    "system that trains its own stage 1 with every seed this one has"
                )
            if system.method != source.method or system.lifelong or system.method == SystemMethod.FULL_FINETUNE:
                raise InputError(f"experiment preset: {system.name!r}: a stage-2 variant keeps its source's method "
                                 "and does not expand again")  # fmt: skip

    @property
    def langs(self) -> tuple[str, ...]:
        return (*self.old, *self.new, *self.lifelong)

    def system(self, name: str) -> System | None:
        return next((s for s in self.systems if s.name == name), None)


# 4-layer demo model: uniform MoE-LPR with 4 experts per layer (12 new) against LayerMoE at a budget of 2.5 per
# layer (10: 6 new, half as many), at least 2 per layer as in the paper's allocations (so the classifier layers,
# the most similar ones, have a router to steer) and at most 4 (the tiny model's layer-0 similarity is near zero,
# and Eq. 10's 1/T_i would give it everything).
UNIFORM = System("MoE-LPR uniform (4/layer)", SystemMethod.UNIFORM, 4, "0", min_experts=4, max_experts=4)
LAYERMOE = System("LayerMoE", SystemMethod.LAYERMOE, 2.5, "2", min_experts=2, max_experts=4)
DENSE_FINETUNE = System("Dense full fine-tune", SystemMethod.FULL_FINETUNE)

CLASSIFIER_CLAIM = Claim("The classifier protects old languages", "old")
PLACEMENT_CLAIM = Claim("Classifiers on the most similar layers beat the last layers", "old")
ALLOCATION_CLAIM = Claim("Similarity-based allocation beats random at equal budget", "new")


def ablations(reference: System, k: int) -> tuple[System, ...]:
    """The reference system with one thing changed each: random allocation, no classifier, last-K classifiers."""
    return (
        replace(reference, name=f"{reference.name} w/ random allocation", method=SystemMethod.RANDOM, curve=False,
                lifelong=False, ablates=ALLOCATION_CLAIM),
        replace(reference, name=f"{reference.name} w/o classifier", classifier_layers="0", curve=False,
                lifelong=False, ablates=CLASSIFIER_CLAIM),
        replace(reference, name=f"{reference.name}, classifier on last-{k} layers", classifier_layers=f"last-{k}",
                curve=False, lifelong=False, ablates=PLACEMENT_CLAIM),
    )  # fmt: skip


def curve_systems(
    uniform: tuple[float, ...],
    layermoe: tuple[float, ...],
    reference: int,
    k: int,
    seeds: tuple[int, ...],
    reference_seeds: tuple[int, ...] | None = None,
) -> list[System]:
    """The budget–quality curve: uniform MoE-LPR at `uniform` experts per layer, LayerMoE at `layermoe` (budgets per
    layer chosen so that Eq. 10's ceiling lands near uniform's totals) and random allocation at LayerMoE's totals.
    Uniform runs every seed at every point (the headline's interval resamples them); LayerMoE and random run
    `reference_seeds` (default: the same) at index `reference`, where uniform and LayerMoE also expand again."""
    at_reference = reference_seeds or seeds
    systems = []
    for i, (u_budget, budget) in enumerate(zip(uniform, layermoe, strict=True)):
        main = i == reference
        n = round(u_budget)
        systems.append(System(f"MoE-LPR uniform ({n}/layer)", SystemMethod.UNIFORM, n, "0", n, n, curve=True,
                              seeds=seeds, lifelong=main))  # fmt: skip
        systems.append(System(f"LayerMoE ({budget:g}/layer)", SystemMethod.LAYERMOE, budget, str(k), curve=True,
                              seeds=at_reference if main else (0,), lifelong=main))  # fmt: skip
        systems.append(System(f"Random allocation ({budget:g}/layer)", SystemMethod.RANDOM, budget, str(k), curve=True,
                              seeds=at_reference if main else (0,),
                              ablates=ALLOCATION_CLAIM if main else None))  # fmt: skip
    return systems


# The paper preset, on the calibrated testbed (`layermoe calibrate`, docs/results/calibration/): the 12-layer base
# with each expert a third of the size (`pretrain --preset deep-narrow`, FFN 128), the cheapest grid point where
# more experts buy quality beyond the seeds. Its T_0 … T_4 are below 0.05 and raised to it (min_score, a stated rule,
# recorded in each allocation). Eq. 10's ceiling moves in steps on that profile: LayerMoE's budgets of 1.75, 2.33,
# 3.25 and 5.5 per layer give 15, 25, 35 and 61 new experts, against uniform's 12, 24, 36 and 60.
PAPER_SEEDS = (0, 1, 2)
PAPER_K = 3  # the paper's K = 7 of 24 layers, scaled to 12
_PAPER_CURVE = curve_systems((2, 3, 4, 6), (1.75, 2.33, 3.25, 5.5), 1, PAPER_K, PAPER_SEEDS)
PAPER_REFERENCE = next(s for s in _PAPER_CURVE if s.name == "LayerMoE (2.33/layer)")
_PAPER_ABLATIONS = tuple(
    a for a in ablations(PAPER_REFERENCE, PAPER_K) if a.method != SystemMethod.RANDOM
)  # random: curve


def stage2_variants(sources: tuple[System, ...], variants: dict[str, dict]) -> list[System]:
    """Each source system (which trains stage 1 with the preset's stage 2) and, per variant, a system that runs only
    stage 2 again from the source's stage-1 models with the variant's settings."""
    systems = list(sources)
    for label, settings in variants.items():
        for source in sources:
            systems.append(replace(source, name=f"{source.name}, stage 2 {label}", stage2=tuple(settings.items()),
                                   stage1_of=source.name, ablates=None))  # fmt: skip
    return systems


# The stage-2 study (docs/results/stage2/): on the `deep` base (FFN 352), with the paper preset's data and stage 1,
# uniform MoE-LPR and LayerMoE at ~24 new experts over 3 seeds; stage 2 as the paper publishes it (lr 1e-2, 60 steps,
# γ = η = 0.1, 3,000 documents per language, no anchor), then variants, each from the same stage-1 models: the router
# anchor (not the paper's: training/router_anchor.py), the learning rate, the LPR weight and the review mix.
STAGE2_SOURCES = (
    System("MoE-LPR uniform (3/layer)", SystemMethod.UNIFORM, 3, "0", 3, 3, seeds=PAPER_SEEDS),
    System("LayerMoE (2.5/layer)", SystemMethod.LAYERMOE, 2.5, str(PAPER_K), seeds=PAPER_SEEDS),
)
STAGE2_VARIANTS = {  # the router anchor's first: the fix; then what the paper's own knobs do
    "anchor β 1": {"router_anchor_beta": 1.0},
    "anchor β 3": {"router_anchor_beta": 3.0},
    "anchor β 0.3": {"router_anchor_beta": 0.3},
    "anchor β 1, γ 0.3": {"router_anchor_beta": 1.0, "lpr_gamma": 0.3},
    "lr 3e-3": {"lr": 3e-3},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-3, γ 1": {"lr": 1e-3, "lpr_gamma": 1.0},
    "lr 1e-3, 1:2 review": {"lr": 1e-3, "stage2_docs_per_old_lang": 1500},
    "γ 0.01": {"lpr_gamma": 0.01},
}

# Stage 2 with the router anchor at β = 0.3 (training/router_anchor.py): the stage-2 study (docs/results/stage2/)
# found that the paper's stage 2 gives back about half of stage 1's new-language gain on the `deep` base, and that
# the anchor at 0.3 keeps over 80% of it with Old-avg within 2% of the dense base.
PAPER = Preset(
    systems=(*_PAPER_CURVE, *_PAPER_ABLATIONS, DENSE_FINETUNE),
    stage2_settings=(("router_anchor_beta", 0.3),),
    lifelong=("es", "it"),
    base="deep-narrow",
    reference=PAPER_REFERENCE.name,
    baseline="MoE-LPR uniform (3/layer)",
    min_score=0.05,
    stage1_steps=150,
    stage2_steps=60,
    eval_max_tokens=10_000,
)

# The router anchor's weight on the calibrated base: the paper preset's uniform (3/layer) and LayerMoE (2.33/layer)
# systems, seeds 0-2 (run into the paper preset's directory, their stage 1 and stage 2 are its own), and stage 2
# again from their stage-1 models at β 0.1 and 1 (docs/results/stage2-narrow/).
STAGE2_NARROW_SOURCES = tuple(
    replace(s, curve=False, lifelong=False, ablates=None)
    for s in PAPER.systems
    if s.name in (PAPER.baseline, PAPER.reference)
)
STAGE2_NARROW_VARIANTS = {"anchor β 0.1": {"router_anchor_beta": 0.1}, "anchor β 1": {"router_anchor_beta": 1.0}}

# The real pretrained base (`layermoe real-base`: SmolLM2-135M-Instruct, Llama, 30 layers, mostly English):
# English is the old language, French, Russian and Greek the new ones. Documents end with its tokenizer's EOS,
# <|im_end|>, measured against its pretraining separator <|endoftext|>: English test bits per byte 0.883 against
# 1.168 (the Instruct model reads <|endoftext|> as the unknown token it now is). Its similarity profile has the real
# shape (low early, a middle plateau, a dip at layers 23-26, high at the end): no score floor.
REAL = Preset(
    systems=(),
    old=("en",),
    new=("fr", "ru", "el"),
    base="smollm2",
    profile_tokens=10_000,
    min_score=None,
    seq_len=256,
    stage1_steps=60,
    stage1_lr=2e-4,
    stage2_steps=30,
    stage2_lr=1e-3,
    stage2_docs=2000,
    eval_max_tokens=10_000,
    extra_train={"warmup_steps": 10},
    stage2_settings=(("router_anchor_beta", 0.3),),
)
REAL_SEEDS = (0, 1)
# The premise of layer-wise allocation: the same 20 new experts (2 a layer) in the 10 least similar layers against
# the 10 most similar ones, no classifier; allocating by similarity only makes sense if the first gains more.
REAL_PREMISE = tuple(
    System(f"{which} similar 10 layers (2 new each)", method, 50 / 30, "0", seeds=REAL_SEEDS, focus_layers=10)
    for which, method in (("Least", SystemMethod.LEAST_SIMILAR), ("Most", SystemMethod.MOST_SIMILAR))
)

# The paper's question on the real base (`layermoe experiment --preset real`): the budget–quality curve of uniform
# MoE-LPR at 1, 2 and 3 new experts a layer (30, 60, 90 new), LayerMoE at budgets of 1.8, 2.5 and 3 a layer with
# exact rounding (24 new, 40% of uniform's middle point, as the paper's headline; 45; 60), random allocation at
# LayerMoE's totals, and the dense full fine-tune, the forgetting the method exists to avoid; every final model's
# English is also read on the Python docs (`data off-domain`). K = 7 classifier layers, the paper's. Uniform runs
# seeds 0 and 1 at every point, LayerMoE and random seeds 0-2 at 24 new (the headline's point, where LayerMoE
# against random differs by about a seed sd). Runs go seed by seed: every system's seed 0 before any seed 1. Run into
# the calibration's 60-step point (runs/real-calibration/smollm2-base-60-stage-1-steps), its uniform runs at 1 and 3
# new a layer are this preset's own (the same settings: cache hits).
REAL_K = 7
REAL_CURVE = tuple(
    replace(system, lifelong=False)
    for system in curve_systems((2, 3, 4), (1.8, 2.5, 3.0), 0, REAL_K, REAL_SEEDS, reference_seeds=(0, 1, 2))
)
REAL_REFERENCE = next(s for s in REAL_CURVE if s.name == "LayerMoE (1.8/layer)")

PRESETS = {
    # make demo: the dense base, MoE-LPR's uniform allocation, LayerMoE with half the new experts.
    "demo": Preset(systems=(UNIFORM, LAYERMOE)),
    # plus: the forgetting baseline; the ablations (random allocation at LayerMoE's budget, no classifier,
    # classifiers on the last layers); the lifelong G0 → G1 → G2 expansion of both; seeds 0-2 of both.
    "full": Preset(
        systems=(
            replace(UNIFORM, lifelong=True, seeds=PAPER_SEEDS),
            replace(LAYERMOE, lifelong=True, seeds=PAPER_SEEDS),
            DENSE_FINETUNE,
            *ablations(LAYERMOE, 2),
        ),
        lifelong=("es", "it"),
    ),
    # The paper's questions on the calibrated 12-layer base: the budget–quality curve of uniform MoE-LPR, LayerMoE
    # and random allocation at ~12, 24, 36 and 60 new experts (uniform over 3 seeds at each, for the headline's
    # interval); at ~24, every claim over 3 seeds (ablations, lifelong expansion).
    "paper": PAPER,
    "stage2-study": replace(  # its first rows run the paper's stage 2 as published (no anchor)
        PAPER,
        systems=tuple(stage2_variants(STAGE2_SOURCES, STAGE2_VARIANTS)),
        base="deep",
        reference=STAGE2_SOURCES[1].name,
        baseline=STAGE2_SOURCES[0].name,
        lifelong=(),
        router_only_eval=True,
        stage2_settings=(),
    ),
    "stage2-narrow": replace(
        PAPER, systems=tuple(stage2_variants(STAGE2_NARROW_SOURCES, STAGE2_NARROW_VARIANTS)), lifelong=()
    ),
    "real-premise": replace(REAL, systems=REAL_PREMISE, reference=REAL_PREMISE[0].name, baseline=REAL_PREMISE[1].name),
    "real": replace(
        REAL,
        systems=(*REAL_CURVE, DENSE_FINETUNE),
        reference=REAL_REFERENCE.name,
        baseline="MoE-LPR uniform (3/layer)",
        rounding="exact",
        off_domain=True,
    ),
}
