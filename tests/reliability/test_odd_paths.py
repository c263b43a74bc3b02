"""Odd paths (spaces, newlines, bytes that are not UTF-8, leading dashes, non-ASCII) work in every command,
reports and figures included, or give a one-line error; no message fails to print."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from rlsubnet.testing import llama_specs, write_synthetic_pair

NAMES = {
    "space": "with space",
    "newline": "new\nline",
    "not-utf8": os.fsdecode(b"caf\xe9"),  # what Python makes of a Latin-1 file name: 'caf\udce9'
    "dash": "-dash",
    "unicode": "ünïcødé ✓",
}


@pytest.fixture(params=list(NAMES), ids=list(NAMES))
def odd(request, tmp_path):
    name = NAMES[request.param]
    folder = tmp_path / name
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip(f"this file system does not take the name {name!r}")
    base, tuned = folder / f"base {name}", folder / f"tuned {name}"
    write_synthetic_pair(base, tuned, specs=llama_specs(1, 8, 16, 8), density=0.2)
    return name, folder, base, tuned


def test_every_command_works_with_odd_paths(odd, cli):
    name, d, base, tuned = odd

    def ok(*argv):
        code, _, err = cli(*argv)
        assert code == 0, (argv, err)

    code, out, err = cli("compare", base, tuned, "--out", d / f"cmp {name}", "-q")
    assert code == 0, err
    summary = json.loads((d / f"cmp {name}" / "summary.json").read_bytes())  # valid JSON, valid UTF-8
    assert summary["base"] == str(base) and summary["tuned"] == str(tuned)  # the exact path, escaped in JSON
    (d / f"cmp {name}" / "layers.csv").read_bytes().decode("utf-8")
    assert {"heatmap.png", "sparsity_vs_atol.png"} <= {p.name for p in (d / f"cmp {name}").iterdir()}
    code, out, err = cli("compare", base, tuned, "--json", "-q")
    assert code == 0 and json.loads(out)["tuned"] == str(tuned), err

    m1, m2 = d / f"{name}-1.mask", d / f"{name}-2.mask"
    ok("mask", base, tuned, "-o", m1, "-q")
    ok("mask", "--random", m1, "-o", m2)
    ok("mask", "--info", m1)
    code, out, err = cli("mask", "--union", m1, m2, "-o", d / f"{name}-u.mask", "--json")
    assert code == 0 and json.loads(out)["path"] == str(d / f"{name}-u.mask"), err
    ok("overlap", m1, m2, "--base", base, "--out", d / f"ov {name}", "-q")
    overlap = json.loads((d / f"ov {name}" / "overlap.json").read_bytes())
    assert [m["label"] for m in overlap["settings"]["masks"]] == [str(m1), str(m2)]
    (d / f"ov {name}" / "pairs.csv").read_bytes().decode("utf-8")

    patch = d / f"{name}.rlpatch"
    ok("patch", "create", base, tuned, "-o", patch, "-q")
    ok("patch", "info", patch, "--verify")
    ok("patch", "apply", base, patch, "-o", d / f"out {name}", "-q")
    code, out, err = cli("patch", "apply", base, patch, "-o", d / f"out {name}.safetensors", "-q", "--json")
    assert code == 0 and json.loads(out)["out"] == str(d / f"out {name}.safetensors"), err


def test_errors_about_odd_paths_are_one_line(odd, cli, expect_error):
    name, d, base, tuned = odd
    missing = d / f"missing {name}"
    code, _, err = cli("compare", missing, tuned)
    line = expect_error(code, err, "no such file or folder")
    assert name.replace("\n", "\\n").encode("utf-8", "backslashreplace").decode() in line
    code, _, err = cli("patch", "apply", base, missing, "-o", d / "o")
    expect_error(code, err)


def test_leading_dashes(tmp_path, cli, expect_error, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_pair("-base", "-tuned", specs=llama_specs(1, 8, 16, 8), density=0.2)
    # a bare name that starts with '-' reads as an option: one line that says so
    code, _, err = cli("compare", "-base", "-tuned")
    expect_error(code, err, "'-base' read as an option")
    code, _, err = cli("mask", "./-base", "./-tuned", "-o", "-m.mask")
    expect_error(code, err, "'-m.mask' read as an option")
    # written as ./-NAME, after --, or attached to the option, it works
    assert cli("compare", "--", "-base", "-tuned", "--json")[0] == 2  # after --, "--json" is a path too
    code, _, err = cli("compare", "./-base", "./-tuned", "--out=-report", "--json", "-q")
    assert code == 0 and (tmp_path / "-report" / "summary.json").is_file(), err
    assert cli("mask", "./-base", "./-tuned", "--output=-m.mask", "-q")[0] == 0
    assert cli("patch", "create", "./-base", "./-tuned", "--out=-p.rlpatch", "-q")[0] == 0
    assert cli("patch", "apply", "./-base", "./-p.rlpatch", "--out=-rebuilt", "-q")[0] == 0
    assert (tmp_path / "-m.mask").is_file() and (tmp_path / "-rebuilt" / "model.safetensors").is_file()


def test_messages_print_on_a_terminal_that_cannot_encode_the_path(tmp_path, monkeypatch):
    """An ASCII-only (strict) stdout/stderr: paths print with escapes, never a UnicodeEncodeError."""
    from rlsubnet.cli.main import main

    name = os.fsdecode(b"caf\xe9 \xc3\xbc")
    write_synthetic_pair(tmp_path / f"b {name}", tmp_path / f"t {name}", specs=llama_specs(1, 8, 16, 8), density=0.2)
    streams = {k: io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict", write_through=True) for k in ("out", "err")}
    monkeypatch.setattr(sys, "stdout", streams["out"])
    monkeypatch.setattr(sys, "stderr", streams["err"])
    assert main(["compare", str(tmp_path / f"b {name}"), str(tmp_path / f"t {name}"), "-q"]) == 0
    assert main(["compare", str(tmp_path / f"missing {name}"), str(tmp_path / f"t {name}")]) == 2
    assert main(["mask", str(tmp_path / f"b {name}"), str(tmp_path / f"t {name}"), "-o", str(tmp_path / f"{name}.mask"), "-q"]) == 0
    out, err = (s.buffer.getvalue().decode("ascii") for s in streams.values())
    assert "base: " in out and "caf\\udce9" in out and "wrote " in out
    assert err.count("\n") == 1 and err.startswith("rlsubnet: error: ") and "caf\\udce9" in err
    assert sys.stdout.errors == "strict"  # restored after the run
