"""``rlsubnet`` entry point. Subcommand modules are imported lazily so ``--help`` stays instant.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Bad input raises
:class:`~rlsubnet.errors.RlsubnetError`; it is printed here as one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from rlsubnet._version import __version__
from rlsubnet.errors import RlsubnetError

# subcommand name -> module under rlsubnet.cli
SUBCOMMANDS = {
    "compare": "compare",
    "demo": "demo",
    "mask": "mask",
    "overlap": "overlap",
    "patch": "patch",
    "train": "train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlsubnet",
        description="Measure, extract, train and ship the sparse subnetworks that RL finetuning updates.",
    )
    parser.add_argument("--version", action="version", version=f"rlsubnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"rlsubnet.cli.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except RlsubnetError as exc:
        print(f"rlsubnet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlsubnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`rlsubnet compare ... | head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # The library turns the errors it expects into RlsubnetError; this catches what the file system says
        # anywhere else (a full disk, a folder we may not write, an output path under a regular file). Outputs
        # are written under temporary names, so nothing half-written is left; say which path, in one line.
        where = exc.filename if exc.filename is not None else "rlsubnet"
        print(f"rlsubnet: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
