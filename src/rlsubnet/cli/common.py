"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.fileio import output_lock


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint loading")
    g.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt pickle checkpoints (with weights_only=True)"
    )
    g.add_argument("--allow-download", action="store_true", help="let a hub id download (default: local cache only)")


class Number:
    """An argparse ``type`` that parses a number and checks its range (:mod:`rlsubnet.limits`).

    A bad value raises :class:`~rlsubnet.errors.UsageError` naming the option, which ``rlsubnet.cli.main``
    prints as one line (argparse's own error would print the usage block and call NaN or 1e400 a float)."""

    def __init__(self, option: str, kind: type = int, lo: float = 0, hi: float | None = None, *, lo_open: bool = False):
        self.option, self.kind, self.lo, self.hi, self.lo_open = option, kind, lo, hi, lo_open

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise UsageError(f"{self.option} must be {what}, got {text!r}") from None
        hi = float("inf") if self.hi is None else self.hi
        if self.kind is int:
            return limits.integer(value, self.option, int(self.lo), hi)
        return limits.real(value, self.option, self.lo, hi, lo_open=self.lo_open)


class Seed(Number):
    """A seed: a non-negative integer below 2**63."""

    def __init__(self, option: str = "--seed"):
        super().__init__(option, int)

    def __call__(self, text: str):
        value: int | str
        try:
            value = int(text)
        except ValueError:
            value = text
        return limits.seed(value, self.option)


def add_atol_option(p: argparse.ArgumentParser, default=(0.0, 1e-5)) -> None:
    p.add_argument(
        "--atol",
        type=Number("--atol", float),
        nargs="+",
        default=list(default),
        metavar="ATOL",
        help="absolute tolerances: |Δ| ≤ atol counts as unchanged; 0 = bitwise (default: %(default)s)",
    )


def add_mode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        "--dtype",  # the flag's first name, still documented and in scripts
        dest="mode",
        choices=limits.COMPARE_MODES,
        default="bf16",
        help="comparison mode, the dtype Δ is computed in: bf16 casts both sides to bfloat16 as the paper did "
        "(default); fp32 casts to float32; native keeps the stored dtype (--dtype is the same option)",
    )


def add_output_options(p: argparse.ArgumentParser, json_help: str, out_help: str | None = None) -> None:
    """--json (with ``json_help``), --out DIR (when the command writes a folder: ``out_help``) and --quiet."""
    p.add_argument("--json", action="store_true", help=json_help)
    if out_help:
        p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def holding_output(out: str | None, members, run, args: argparse.Namespace) -> int:
    """``run(args)`` as the one writer of the output folder ``out`` (its ``members``) for the whole run."""
    if not out:
        return run(args)
    with output_lock(out, members=members):
        return run(args)


def print_result(args: argparse.Namespace, as_json, as_text, wrote: str) -> int:
    """Print the result as JSON (``--json``) or as text, with what was written to ``--out`` (``wrote``)."""
    if args.json:
        print_json(as_json())
    else:
        print(as_text())
        if args.out:
            print(f"\nwrote {args.out}/{wrote}")
    return 0


def loading_options(args: argparse.Namespace) -> dict:
    """What :func:`add_checkpoint_options` and ``--quiet`` set, as the keywords the library's functions take."""
    return {"allow_pickle": args.allow_pickle, "allow_download": args.allow_download, "progress": not args.quiet}
