"""``rlsubnet`` entry point. Subcommand modules are imported lazily so ``--help`` stays instant.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Bad input raises
:class:`~rlsubnet.errors.RlsubnetError`; it is printed here as one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import ClassVar

from rlsubnet._version import __version__
from rlsubnet.errors import RlsubnetError

# subcommand name -> module under rlsubnet.cli
SUBCOMMANDS = {
    "compare": "compare",
    "demo": "demo",
    "mask": "mask",
    "overlap": "overlap",
    "patch": "patch",
    "predict": "predict",
    "train": "train",
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like every other error of the CLI."""

    argv: ClassVar[Sequence[str]] = ()  # the command line being parsed, for the hint below
    options: ClassVar[set[str]] = set()  # every option string of every subcommand

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Negative numbers in any notation are values, not options (-1e-5, -inf): the range check names them.
        self._negative_number_matcher = re.compile(
            r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|nan)$", re.IGNORECASE
        )

    def add_argument(self, *args, **kwargs):
        _Parser.options.update(a for a in args if a.startswith("-"))
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        hint = ""
        # A file name that starts with '-' reads as an option: say so when that may be what went wrong.
        dashed = [a for a in self.argv if a.startswith("-") and a != "--" and a.split("=")[0] not in self.options]
        if dashed and ("expected" in message or "unrecognized" in message or "required" in message):
            hint = f" ({dashed[0]!r} read as an option? write a path that starts with '-' as ./-NAME or --out=-NAME)"
        self.exit(2, f"{self.prog}: error: {_one_line(message)}{hint}; see {self.prog} --help\n")


def _one_line(text: str) -> str:
    # A file name may hold a newline; an error message must stay one line.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlsubnet",
        description="Measure, extract, train and ship the sparse subnetworks that RL finetuning updates.",
    )
    parser.add_argument("--version", action="version", version=f"rlsubnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(f"rlsubnet.cli.{module}").add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised in the main thread like Ctrl-C, so that every ``except BaseException`` /
    ``finally`` on the way out removes its temporaries (a plain SIGTERM would end the process on the spot)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    # Ignore repeats: a second TERM must not cut the cleanup that the first one started.
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_clean_up() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:  # nohup and the like asked for this signal to be ignored
            continue
        saved[sig] = previous
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def _printable_streams() -> Iterator[None]:
    """What the terminal cannot encode (a file name's undecodable bytes, held as lone surrogates; non-ASCII on
    an ASCII terminal) prints as backslash escapes instead of failing with UnicodeEncodeError halfway through
    an output or an error message."""
    saved = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="backslashreplace")
                saved.append(stream)
    try:
        yield
    finally:
        for stream in saved:
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="strict")


def main(argv: Sequence[str] | None = None) -> int:
    with _printable_streams(), _signals_clean_up():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    from rlsubnet import fileio

    parser = build_parser()
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    except RlsubnetError as exc:  # an option's value out of its range (rlsubnet.cli.common.Number)
        print(f"rlsubnet: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    fileio.set_run_label(" ".join(["rlsubnet", *(sys.argv[1:] if argv is None else argv)]))
    try:
        return int(args.run(args) or 0)
    except RlsubnetError as exc:
        print(f"rlsubnet: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"rlsubnet: terminated (signal {exc.signum})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("rlsubnet: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            "rlsubnet: error: out of memory (an input larger than this machine's memory, or options that ask "
            "for too much at once)",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # The reader went away (`rlsubnet compare ... | head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # The library turns the errors it expects into RlsubnetError; this catches what the file system says
        # anywhere else (a full disk, a folder we may not write, an output path under a regular file). Outputs
        # are written under temporary names, so nothing half-written is left; say which path, in one line.
        where = exc.filename if exc.filename is not None else "rlsubnet"
        print(_one_line(f"rlsubnet: error: {where}: {exc.strerror or exc}"), file=sys.stderr)
        return 2
    finally:
        fileio.set_run_label(None)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
