"""Fixtures for the reliability tests: the CLI as a user calls it, and its one-line errors."""

from __future__ import annotations

import pytest

from rlsubnet.cli.main import main


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of ``rlsubnet ARGV`` run in this process."""

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert exit status 2 and exactly one stderr line, an error with no traceback naming every needle."""
    assert code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def expect_error():
    return one_line_error
