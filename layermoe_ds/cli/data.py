"""`layermoe data build|off-domain|tokenize|verify` and `layermoe tokenizer train`."""

from __future__ import annotations

# Library imports live in each verb's body: `layermoe --help` stays at ~0.15 s instead of ~8 s of torch,
# DeepSpeed and transformers imports.
import logging
from pathlib import Path

from layermoe_ds.cli.common import DEFAULT_CACHE, lang_list
from layermoe_ds.flags import count, positive, share

log = logging.getLogger("layermoe")


def add_data(sub) -> None:
    p = sub.add_parser("data", help="build the embedded corpus; tokenize text once into memory-mapped shards")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    b = verbs.add_parser(
        "build",
        help="fetch Debian libreoffice-help-* packages and extract a parallel corpus",
        description="Build data/<lang>.{train,valid,test}.txt and data/manifest.json from Debian's "
        "libreoffice-help-* packages (MPL-2.0), split by page ≈ 90/5/5.",
    )
    b.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: data)")
    b.add_argument("--langs", type=lang_list, default=None, help="languages (default: en,de,fr,ru,el,es,it; also zh)")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where .deb files are kept ({DEFAULT_CACHE})")
    b.add_argument("--max-pages", type=count(), default=None, help="a deterministic slice of help pages (tests)")
    b.add_argument("--min-chars", type=count(0), default=24, help="drop paragraphs shorter than this (default: 24)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching corpus exists")
    b.set_defaults(func=_cmd_data_build)
    o = verbs.add_parser(
        "off-domain",
        help="English from outside the corpus's domain (the Python docs), to read forgetting on",
        description="Build OUT/en.test.txt from Debian's python3.11-doc (PSF License): the tutorial, HOWTOs, FAQ, "
        "language reference and what's-new pages, prose only, one document a page, all in the test split. The "
        "embedded corpus is one domain in every language, so training on its new languages teaches English that "
        "domain too; this text reads the old language off it. A built directory is reused.",
    )
    o.add_argument("--out", type=Path, default=Path("data/off-domain"), help="default: %(default)s")
    o.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where .deb files are kept ({DEFAULT_CACHE})")
    o.add_argument("--max-pages", type=count(), default=None, help="a deterministic slice of the pages (tests)")
    o.set_defaults(func=_cmd_data_off_domain)
    t = verbs.add_parser(
        "tokenize",
        help="tokenize raw text once into memory-mapped token shards (what every later step reads)",
        description="Stream the raw files of --data (.txt, .jsonl, .jsonl.gz/.zst/.xz, Parquet, save_to_disk Arrow: "
        "flat <lang>.<split>.<ext> names, <lang>/ folders as CulturaX, FineWeb-2, HPLT and MADLAD-400 ship them, or "
        "a --lang-field; docs/data.md), tokenize them in worker processes and write per language and split: token "
        "shards (uint16 ids when the vocabulary fits, else uint32), a document index and token_manifest.json "
        "(sources' sizes and SHA-256, the tokenizer's fingerprint, counts, what was sampled and carved). Give OUT as "
        "`data:` of any step. A killed run: run it again.",
    )
    t.add_argument("--data", type=Path, required=True, help="raw data directory, or one file of records")
    t.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer (or model) directory")
    t.add_argument("--out", type=Path, required=True, help="the prepared directory to write")
    t.add_argument("--langs", type=lang_list, default=None, help="languages (default: every one in --data)")
    t.add_argument("--splits", type=lang_list, default=None, help="e.g. train,valid (default: every split found)")
    t.add_argument("--workers", type=count(), default=None, help="tokenizer processes (default: CPUs, at most 8)")
    t.add_argument("--chunk-mb", type=positive, default=32.0, help="input MB a worker takes at a time (default: 32)")
    t.add_argument("--text-field", default="text", help="the text column or key (default: text)")
    t.add_argument(
        "--lang-field",
        default=None,
        help="the column or key naming each record's language, for files that mix languages (default: the path "
        "says; one file given as --data: lang)",
    )
    t.add_argument(
        "--lang-map",
        default=None,
        help="CODE=LANG pairs (ekk_Latn=et,zsm_Latn=ms) or a JSON file of them: codes FLORES-200's table does not map "
        "to the short codes the project uses",
    )
    t.add_argument(
        "--max-docs-per-lang",
        default=None,
        help="a seeded hash sample of each language's training documents: one count, or el=100000,ru=50000",
    )
    t.add_argument(
        "--max-tokens-per-lang",
        default=None,
        help="the same, by tokens (one count, or LANG=COUNT pairs): lands near the count, the manifest says where",
    )
    t.add_argument("--sample-seed", type=count(0), default=0, help="the hash's seed for sampling and carving")
    t.add_argument(
        "--holdout-fraction",
        type=share(0.5),
        default=0.01,
        help="a language whose text names no split gets valid and test carved from it by a hash, this share of its "
        "documents each (default: 0.01; 0: none)",
    )
    t.add_argument(
        "--doc-separator",
        default=None,
        metavar="TOKEN",
        help="the token that ends each document (default: the tokenizer's EOS). An Instruct tokenizer's EOS ends "
        "chat turns (SmolLM2/Qwen2.5-Instruct: <|im_end|>); pretraining separated documents with e.g. "
        "<|endoftext|>. Recorded in the manifest; a warning says when the EOS is a chat-turn token",
    )
    t.set_defaults(func=_cmd_data_tokenize)
    v = verbs.add_parser(
        "verify", help="check every shard of a prepared directory against its manifest (sizes, SHA-256)"
    )
    v.add_argument("prepared", type=Path)
    v.set_defaults(func=_cmd_data_verify)


def _cmd_data_build(args) -> int:
    from layermoe_testbed.corpus import DEFAULT_LANGS, CorpusOptions, build_corpus, corpus_is_built

    options = CorpusOptions(
        langs=tuple(args.langs or DEFAULT_LANGS), min_chars=args.min_chars, max_pages=args.max_pages
    )
    if not args.force and corpus_is_built(args.out, options):
        log.info("corpus in %s is up to date (use --force to rebuild)", args.out)
        return 0
    manifest = build_corpus(args.out, args.cache, options)
    for name, meta in manifest["files"].items():
        print(f"{name:<16} {meta['paragraphs']:>7} paragraphs {meta['bytes'] / 1e6:>7.2f} MB")
    return 0


def _cmd_data_off_domain(args) -> int:
    from layermoe_testbed.off_domain import build_off_domain

    record = build_off_domain(args.out, args.cache, args.max_pages)
    print(f"{args.out / 'en.test.txt'}: {record['documents']} documents, {record['characters']:,} characters from "
          f"{record['package']['file']}")  # fmt: skip
    return 0


def _cmd_data_tokenize(args) -> int:
    from layermoe_ds.data.loading import Reading, select_sources
    from layermoe_ds.data.prepare import default_workers, tokenize
    from layermoe_ds.data.sampling import budgets_for, parse_budget
    from layermoe_ds.data.tokens import describe_manifest
    from layermoe_ds.languages import read_lang_map

    reading = Reading(args.text_field, args.lang_field, read_lang_map(args.lang_map))
    sources = select_sources(args.data, args.langs, args.splits, reading)
    langs = args.langs or sorted({s.lang for s in sources if s.lang is not None})
    budgets = budgets_for(
        langs,
        parse_budget(args.max_docs_per_lang, "--max-docs-per-lang"),
        parse_budget(args.max_tokens_per_lang, "--max-tokens-per-lang"),
    )
    manifest = tokenize(
        sources,
        args.tokenizer,
        args.out,
        workers=args.workers or default_workers(),
        langs=args.langs,
        splits=args.splits,
        chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
        doc_separator=args.doc_separator,
        budgets=budgets,
        seed=args.sample_seed,
        holdout_fraction=args.holdout_fraction,
    )
    print(describe_manifest(manifest, args.out))
    return 0


def _cmd_data_verify(args) -> int:
    from layermoe_ds.data.tokens import verify

    print(f"{args.prepared}: {verify(args.prepared)} shards match the manifest")
    return 0


# --- tokenizer ---------------------------------------------------------------------------------------------------


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    verbs = p.add_subparsers(dest="tokenizer_verb", required=True)
    t = verbs.add_parser(
        "train", help="byte-fallback SentencePiece over old and new languages, saved for AutoTokenizer.from_pretrained"
    )
    t.add_argument("--data", type=Path, required=True, help="data directory or jsonl")
    t.add_argument("--langs", type=lang_list, default=None, help="languages (default: all in --data)")
    t.add_argument("--vocab", type=count(), default=8000, help="vocabulary size (default: 8000)")
    t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    t.add_argument("--out", type=Path, required=True, help="output directory")
    t.set_defaults(func=_cmd_tokenizer_train)


def _cmd_tokenizer_train(args) -> int:
    from layermoe_ds.data.loading import available_languages
    from layermoe_testbed.tokenizer_training import train_tokenizer

    langs = args.langs or sorted(available_languages(args.data))
    train_tokenizer(args.data, langs, args.out, args.vocab, args.model_type)
    print(f"tokenizer ({args.vocab} pieces, {','.join(langs)}) saved to {args.out}")
    return 0
