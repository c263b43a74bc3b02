"""``rlsubnet mask``: build, inspect, combine and randomise subnetwork masks.

rlsubnet mask BASE TUNED --atol 1e-5 -o grpo.mask.safetensors      # entries that changed
rlsubnet mask --info grpo.mask.safetensors                           # density per layer / module
rlsubnet mask --random grpo.mask.safetensors --scope per-tensor --seed 1 -o random.mask.safetensors
rlsubnet mask --union a.mask.safetensors b.mask.safetensors -o both.mask.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlsubnet.cli.common import (
    Number,
    Seed,
    add_checkpoint_options,
    add_mode_option,
    add_output_options,
    loading_options,
    print_json,
)
from rlsubnet.errors import UsageError
from rlsubnet.fileio import output_lock

OPS = ("union", "intersection", "difference")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mask",
        help="build a bit-packed mask of the entries that changed (or inspect, combine, randomise masks)",
        description="Build the mask of entries that changed between BASE and TUNED (|Δ| > atol in the comparison "
        "dtype, the test `rlsubnet compare` uses), stored as ~1 bit per parameter in a safetensors file with its "
        "settings and a record (sizes, layout and content hashes) of both checkpoints. The other actions inspect "
        "(--info), combine (--union, --intersection, --difference) or draw a random mask of matched density (--random).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("inputs", nargs="*", metavar="PATH", help="BASE TUNED (build), or mask files for the other actions")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--info", action="store_true", help="describe MASK: settings, density per layer and module")
    action.add_argument("--random", action="store_true", help="random mask matched to MASK's density (see --scope)")
    for op in OPS:
        action.add_argument(
            f"--{op}",
            action="store_true",
            help=f"{op} of the given masks" + (" (A minus B)" if op == "difference" else ""),
        )
    p.add_argument("-o", "--output", metavar="FILE", help="mask file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--atol",
        type=Number("--atol", float),
        default=1e-5,
        help="|Δ| ≤ atol counts as unchanged; 0 = bitwise (default: %(default)s)",
    )
    add_mode_option(p)
    p.add_argument(
        "--no-hash",
        action="store_true",
        help="skip the content hash of both checkpoints (faster; the "
        "mask then records their names, shapes and sizes only)",
    )
    p.add_argument("--allow-mismatch", action="store_true", help="mask the tensors both hold; record the rest")
    p.add_argument(
        "--scope",
        choices=["per-tensor", "global"],
        default="per-tensor",
        help="--random: match each tensor's count (per-tensor, default) or only the total (global)",
    )
    p.add_argument("--seed", type=Seed(), default=0, help="--random: seed (default 0)")
    p.add_argument("--density", type=Number("--density", float, 0, 1), help="--random: this density instead of MASK's")
    add_checkpoint_options(p)
    add_output_options(p, "print the mask's summary as JSON")
    p.set_defaults(run=run)


def _summary_text(mask, output: str | None) -> str:
    from rlsubnet.masks.build import describe_checkpoint
    from rlsubnet.report.tables import fmt_pct, render_table

    atol = "-" if mask.atol is None else f"{mask.atol:g}"
    lines = []
    if output:
        lines.append(f"wrote {output}")
    lines.append(
        f"{mask.kind} mask: {mask.changed:,} of {mask.numel:,} entries (density {fmt_pct(mask.density)}%, "
        f"sparsity {fmt_pct(mask.sparsity)}%) at atol {atol}, dtype {mask.mode}; {len(mask)} tensors"
    )
    if mask.meta.get("base"):
        lines.append(f"base:  {describe_checkpoint(mask.meta['base'])}")
    if mask.meta.get("tuned"):
        lines.append(f"tuned: {describe_checkpoint(mask.meta['tuned'])}")
    rnd = (mask.meta.get("extra") or {}).get("random")
    if rnd:
        lines.append(f"random: scope {rnd['scope']}, seed {rnd['seed']}, {rnd['matched']}")
    skipped = (mask.meta.get("extra") or {}).get("skipped") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} tensors: " + ", ".join(s["name"] for s in skipped[:8]))
    rows = [[r["module"], f"{r['numel']:,}", f"{r['changed']:,}", fmt_pct(r["density"])] for r in mask.modules()]
    lines += ["", render_table(["module", "params", "in mask", "density %"], rows)]
    rows = [
        ["-" if r["layer"] is None else r["layer"], f"{r['numel']:,}", f"{r['changed']:,}", fmt_pct(r["density"])]
        for r in mask.layers()
    ]
    lines += ["", render_table(["layer", "params", "in mask", "density %"], rows)]
    return "\n".join(lines)


def _make_and_save(args: argparse.Namespace, op: str | None):
    from rlsubnet.masks import Mask, build_mask, random_mask

    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; -o takes a file name")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out}: exists (pass --overwrite to replace it)")
    if args.random:
        mask = random_mask(Mask.load(args.inputs[0]), scope=args.scope, seed=args.seed, density=args.density)
    elif op:
        masks = [Mask.load(p) for p in args.inputs]
        mask = masks[0]
        for other in masks[1:]:
            mask = getattr(mask, op)(other)
    else:
        mask = build_mask(
            args.inputs[0],
            args.inputs[1],
            atol=args.atol,
            mode=args.mode,
            allow_mismatch=args.allow_mismatch,
            hash_content=not args.no_hash,
            **loading_options(args),
        )
    mask.save(out)
    return mask


def run(args: argparse.Namespace) -> int:
    from rlsubnet.masks import Mask

    op = next((o for o in OPS if getattr(args, o)), None)
    n = len(args.inputs)
    if args.info and n != 1:
        raise UsageError("--info takes one mask file")
    if args.random and n != 1:
        raise UsageError("--random takes one mask file to match")
    if op and (n < 2 or (op == "difference" and n != 2)):
        raise UsageError(f"--{op} takes {'two' if op == 'difference' else 'two or more'} mask files")
    if not (args.info or args.random or op) and n != 2:
        raise UsageError("give BASE and TUNED checkpoints (or one of --info, --random, --union, ...)")
    if args.info:
        mask = Mask.load(args.inputs[0])
    else:
        if not args.output:
            raise UsageError("give the mask file to write with -o FILE")
        with output_lock(args.output):  # one writer per output, from the existence check to the rename
            mask = _make_and_save(args, op)
    if args.json:
        summary = mask.summary()
        if not args.info:
            summary["path"] = args.output
        print_json(summary)
    else:
        print(_summary_text(mask, None if args.info else args.output))
    return 0
