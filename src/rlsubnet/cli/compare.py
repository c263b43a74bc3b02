"""``rlsubnet compare BASE TUNED [TUNED ...]``: update sparsity, groupings and rank between checkpoints."""

from __future__ import annotations

import argparse

from rlsubnet.cli.common import (
    Number,
    add_atol_option,
    add_checkpoint_options,
    add_mode_option,
    add_output_options,
    holding_output,
    loading_options,
    print_result,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="measure update sparsity between a base and one or more tuned checkpoints",
        description="Measure which parameters changed between BASE and each TUNED checkpoint, streaming one "
        "tensor at a time. Sparsity = share of parameters unchanged (|Δ| ≤ atol), density = 1 - sparsity.",
    )
    p.add_argument("base", help="base checkpoint: HF folder, .safetensors file, or hub id in the local cache")
    p.add_argument("tuned", nargs="+", help="tuned checkpoint(s), each compared against BASE")
    add_atol_option(p)
    add_mode_option(p)
    p.add_argument("--rank", action="store_true", help="also compute the rank of every 2-D non-norm update matrix")
    p.add_argument(
        "--spectral",
        action="store_true",
        help="also where each 2-D non-norm update points: stable, effective and energy ranks, its share in the "
        "base's top-k singular subspaces, their rotation and the drift of the top-k singular values",
    )
    p.add_argument(
        "--top-k",
        type=Number("--top-k", int, lo=1),
        default=None,
        metavar="K",
        help="with --spectral: the base's top K singular directions (default 16; at most the smallest matrix side)",
    )
    p.add_argument("--allow-mismatch", action="store_true", help="compare the tensors both hold; record the rest")
    add_checkpoint_options(p)
    add_output_options(
        p,
        "print the result as JSON on stdout instead of tables",
        "write summary.json, tensors.jsonl, layers.csv and PNG plots to DIR",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rlsubnet.report.compare_outputs import OUTPUT_FILES

    return holding_output(args.out, OUTPUT_FILES, _run, args)


def _run(args: argparse.Namespace) -> int:
    from rlsubnet.engine import compare_many
    from rlsubnet.report.compare_outputs import results_json, write_compare_outputs
    from rlsubnet.report.tables import format_summary

    results = compare_many(
        args.base,
        args.tuned,
        atol=args.atol,
        mode=args.mode,
        rank=args.rank,
        spectral=args.spectral,
        top_k=args.top_k,
        allow_mismatch=args.allow_mismatch,
        **loading_options(args),
    )
    if args.out:
        write_compare_outputs(results, args.out)
    return print_result(
        args,
        lambda: results_json(results),
        lambda: format_summary(results),
        "summary.json, tensors.jsonl, layers.csv, heatmap*.png, sparsity_vs_atol.png"
        + (", spectral.png" if args.spectral else ""),
    )
