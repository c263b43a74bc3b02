"""Options shared by several subcommands."""

from __future__ import annotations

import argparse


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint loading")
    g.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt pickle checkpoints (with weights_only=True)")
    g.add_argument("--allow-download", action="store_true", help="let a hub id download (default: local cache only)")


def add_atol_option(p: argparse.ArgumentParser, default=(0.0, 1e-5)) -> None:
    p.add_argument(
        "--atol",
        type=float,
        nargs="+",
        default=list(default),
        metavar="ATOL",
        help="absolute tolerances: |Δ| ≤ atol counts as unchanged; 0 = bitwise (default: %(default)s)",
    )


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32", "native"],
        default="bf16",
        help="comparison dtype: bf16 casts both sides to bfloat16 as the paper did (default); fp32 casts to "
        "float32; native keeps the stored dtype",
    )
