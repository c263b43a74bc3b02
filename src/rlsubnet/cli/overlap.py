"""``rlsubnet overlap MASK MASK [MASK ...]``: how much subnetworks overlap, against two chance baselines."""

from __future__ import annotations

import argparse
import sys

from rlsubnet.cli.common import (
    Number,
    add_checkpoint_options,
    add_output_options,
    holding_output,
    loading_options,
    print_result,
)
from rlsubnet.errors import UsageError
from rlsubnet.limits import MAX_BINS_PER_OCTAVE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "overlap",
        help="overlap of subnetwork masks (o1, o2, Jaccard) against chance",
        description="For every pair of masks: o1 = |A∩B|/|A|, o2 = |A∩B|/|B|, Jaccard, the paper's chance baseline "
        "(o1 chance = density of B, o2 chance = density of A) and, with --base, the magnitude-matched chance "
        "(each parameter's change probability depends only on its |w| bucket in the base), overall, per layer "
        "and per module.",
    )
    p.add_argument("masks", nargs="+", metavar="MASK", help="mask files written by `rlsubnet mask` (two or more)")
    p.add_argument(
        "--base",
        metavar="BASE",
        help="the base checkpoint the masks were measured from: adds the magnitude-matched chance baseline",
    )
    p.add_argument(
        "--bins-per-octave",
        type=Number("--bins-per-octave", int, 1, MAX_BINS_PER_OCTAVE),
        default=1,
        metavar="K",
        help="|w| buckets per power of two for the magnitude-matched chance (default 1: one bf16 exponent per bucket)",
    )
    add_checkpoint_options(p)
    add_output_options(
        p,
        "print a JSON list with one object per pair",
        "write overlap.json, pairs.csv, matrix CSVs and heatmap PNGs to DIR",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rlsubnet.report.overlap_outputs import OUTPUT_FILES

    if len(args.masks) < 2:
        raise UsageError("overlap needs at least two masks")
    return holding_output(args.out, OUTPUT_FILES, _run, args)


def _run(args: argparse.Namespace) -> int:
    from rlsubnet.masks import Mask, overlap_many
    from rlsubnet.report.overlap_outputs import format_overlap, pairs_json, write_overlap_outputs

    masks = [Mask.load(m) for m in args.masks]
    result = overlap_many(
        masks,
        list(args.masks),
        base=args.base,
        bins_per_octave=args.bins_per_octave,
        **loading_options(args),
    )
    for w in result.warnings:
        print(f"rlsubnet: warning: {w}", file=sys.stderr)
    if args.out:
        write_overlap_outputs(result, args.out)
    return print_result(
        args,
        lambda: pairs_json(result),
        lambda: format_overlap(result),
        "overlap.json, pairs.csv, matrix_*.csv, heatmap_*.png",
    )
