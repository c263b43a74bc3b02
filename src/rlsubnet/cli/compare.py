"""``rlsubnet compare BASE TUNED [TUNED ...]``: update sparsity, groupings and rank between checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from rlsubnet.cli.common import (
    add_atol_option,
    add_checkpoint_options,
    add_dtype_option,
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
    add_dtype_option(p)
    p.add_argument("--rank", action="store_true", help="also compute the rank of every 2-D non-norm update matrix")
    p.add_argument("--allow-mismatch", action="store_true", help="compare the tensors both hold; record the rest")
    add_checkpoint_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of tables")
    p.add_argument("--out", metavar="DIR", help="write summary.json, tensors.jsonl, layers.csv and PNG plots to DIR")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out:  # one writer per output folder, for the whole run
        from rlsubnet.fileio import output_lock
        from rlsubnet.report.compare_outputs import OUTPUT_FILES

        with output_lock(args.out, members=OUTPUT_FILES):
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from rlsubnet.engine import compare_many
    from rlsubnet.report.compare_outputs import results_json, write_compare_outputs
    from rlsubnet.report.tables import format_summary

    results = compare_many(
        args.base,
        args.tuned,
        atol=args.atol,
        dtype=args.dtype,
        rank=args.rank,
        allow_mismatch=args.allow_mismatch,
        allow_pickle=args.allow_pickle,
        allow_download=args.allow_download,
        progress=not args.quiet,
    )
    if args.out:
        write_compare_outputs(results, args.out)
    if args.json:
        json.dump(results_json(results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_summary(results))
        if args.out:
            print(f"\nwrote {args.out}/summary.json, tensors.jsonl, layers.csv, heatmap*.png, sparsity_vs_atol.png")
    return 0
