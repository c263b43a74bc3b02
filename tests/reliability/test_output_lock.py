"""One writer per output: a second writer is refused naming the first (its pid), a killed writer's temporaries
are removed by the next run that writes there (only rlsubnet's own names for that output), and SIGTERM or
SIGINT in the middle of a write removes the run's temporaries before it exits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import load_dir

import rlsubnet
from rlsubnet.errors import OutputBusyError, RlsubnetError
from rlsubnet.fileio import atomic_dir, lock_file_of, output_lock, own_temporaries

PAUSED = Path(__file__).with_name("paused_cli.py")
SRC = str(Path(rlsubnet.__file__).resolve().parents[1])


@contextlib.contextmanager
def held_elsewhere(out: Path, holder: str):
    """Hold ``out``'s lock as another process would: a flock on its own open file, unknown to output_lock."""
    lock = lock_file_of(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{holder}\n".encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def start_paused(tmp_path: Path, *argv, threaded: bool = False) -> tuple[subprocess.Popen, Path]:
    """Start ``rlsubnet ARGV`` in a child process that pauses after writing its first block (paused_cli.py)."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
               RLSUBNET_TEST_THREADED="1" if threaded else "0")
    proc = subprocess.Popen([sys.executable, str(PAUSED), str(ready), *map(str, argv)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # only so that a broken run cannot hang the suite
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before pausing (exit {proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached its pause")
        time.sleep(0.05)
    return proc, ready


@pytest.fixture
def inputs(sharded_pair, tmp_path, cli):
    """(base, tuned, patch, single): a sharded pair and its patch; a one-shard pair's (base, tuned, patch)."""
    from rlsubnet.testing import llama_specs, write_synthetic_pair

    base, tuned, _, _ = sharded_pair
    assert cli("patch", "create", base, tuned, "-o", tmp_path / "in.rlpatch", "-q")[0] == 0
    for name in ("a.mask", "b.mask"):
        assert cli("mask", base, tuned, "-o", tmp_path / name, "--no-hash", "-q")[0] == 0
    one = (tmp_path / "one-base", tmp_path / "one-tuned", tmp_path / "one.rlpatch")
    write_synthetic_pair(one[0], one[1], specs=llama_specs(1, 16, 32, 16), density=0.2)
    assert cli("patch", "create", one[0], one[1], "-o", one[2], "-q")[0] == 0
    return base, tuned, tmp_path / "in.rlpatch", one


def _commands(base, tuned, patch, one, tmp_path):
    return {
        "compare": (["compare", base, tuned, "--out", "{out}", "-q"], tmp_path / "cmp"),
        "mask": (["mask", base, tuned, "-o", "{out}", "--no-hash", "-q"], tmp_path / "m.mask"),
        "overlap": (["overlap", tmp_path / "a.mask", tmp_path / "b.mask", "--out", "{out}", "-q"], tmp_path / "ov"),
        "patch create": (["patch", "create", base, tuned, "-o", "{out}", "-q"], tmp_path / "p.rlpatch"),
        "patch apply": (["patch", "apply", base, patch, "-o", "{out}", "-q"], tmp_path / "rebuilt"),
        "patch apply file": (["patch", "apply", one[0], one[2], "-o", "{out}", "-q"], tmp_path / "rebuilt.safetensors"),
        "train": (["train", "sft", "--base", base, "--out", "{out}", "-q"], tmp_path / "stage"),
        "demo": (["demo", "--out", "{out}", "--size", "micro", "-q"], tmp_path / "demo"),
    }


COMMANDS = ["compare", "mask", "overlap", "patch create", "patch apply", "patch apply file", "train", "demo"]
RERUN = {"compare", "mask", "overlap", "patch create", "patch apply", "patch apply file"}  # cheap to run for real


@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_writer_is_refused_naming_the_first(inputs, tmp_path, cli, expect_error, command):
    if command == "demo":
        pytest.importorskip("trl")
    argv, out = _commands(*inputs, tmp_path)[command]
    argv = [str(out) if a == "{out}" else a for a in argv]
    stale = out.with_name(f".{out.name}.k3j9x_2a.tmp")  # what a killed writer of this output leaves
    stale.write_bytes(b"half a file")
    with held_elsewhere(out, f"{os.getpid()}: rlsubnet (the test)"):
        code, _, err = cli(*argv)
        expect_error(code, err, str(out), f"another rlsubnet run is writing this output (pid {os.getpid()}: rlsubnet "
                     "(the test))", f".{out.name}.lock")
        assert not out.exists()
        assert stale.exists(), "a temporary may be removed only by the holder of the output's lock"
    if command in RERUN:
        code, _, err = cli(*argv)
        assert code == 0, err
        assert out.exists() and not stale.exists() and not lock_file_of(out).exists()


@pytest.mark.parametrize("sig,threaded", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-threaded"])
@pytest.mark.parametrize("command", ["patch create", "patch apply"])
def test_a_signal_mid_write_leaves_nothing_and_the_lock_is_released(inputs, tmp_path, cli, expect_error, sig, threaded,
                                                                    command):
    """Two `patch apply` (or create) runs into one output: the second is refused while the first runs; the
    first, signalled mid-write, exits 128+N (130 for Ctrl-C) leaving no temporaries, no lock and no output;
    then one run succeeds and a run without --overwrite is refused."""
    argv, out = _commands(*inputs, tmp_path)[command]
    argv = [str(out) if a == "{out}" else a for a in argv]
    proc, _ = start_paused(tmp_path, *argv, threaded=threaded)
    try:
        assert own_temporaries(out), "the paused writer has a temporary on disk"
        assert lock_file_of(out).read_text().startswith(f"{proc.pid}: rlsubnet {command}")
        code, _, err = cli(*argv)
        expect_error(code, err, f"another rlsubnet run is writing this output (pid {proc.pid}: rlsubnet {command}")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), stderr
    assert "Traceback" not in stderr and ("interrupted" if sig == signal.SIGINT else "terminated") in stderr
    assert own_temporaries(out) == [] and not lock_file_of(out).exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    code, _, err = cli(*argv)
    assert code == 0, err
    code, _, err = cli(*argv)
    expect_error(code, err, str(out), "exists")


@pytest.mark.parametrize("command", ["patch create", "patch apply", "patch apply file"])
def test_a_killed_writers_temporaries_are_removed_by_the_next_run_and_nothing_else(inputs, tmp_path, cli, command):
    argv, out = _commands(*inputs, tmp_path)[command]
    argv = [str(out) if a == "{out}" else a for a in argv]
    proc, _ = start_paused(tmp_path, *argv)
    proc.kill()
    proc.communicate(timeout=120)
    litter = own_temporaries(out)
    assert litter and lock_file_of(out).exists(), "kill -9 leaves what only the next run can remove"
    users = [tmp_path / ".foo.tmp", out.with_name(f".{out.name}.mine.tmp"), out.with_name(f".{out.name}.abcdefgh.tmp.bak"),
             tmp_path / ".other.rlpatch.abcdefgh.tmp", out.with_name(f"{out.name}.abcdefgh.tmp")]
    for p in users:
        p.write_text("the user's")
    code, _, err = cli(*argv)
    assert code == 0, err
    assert own_temporaries(out) == [] and not any(p.exists() for p in litter) and not lock_file_of(out).exists()
    assert all(p.read_text() == "the user's" for p in users)
    if command == "patch create":
        assert cli("patch", "info", out, "--verify")[0] == 0
    else:
        from safetensors.torch import load_file

        rebuilt = load_dir(out) if out.is_dir() else load_file(out)
        expected = load_dir(inputs[1] if out.is_dir() else inputs[3][1])
        assert rebuilt.keys() == expected.keys() and all(rebuilt[k].equal(expected[k]) for k in expected)


def test_a_folder_output_cleans_its_own_members_temporaries(inputs, tmp_path, cli):
    base, tuned, _, _ = inputs
    out = tmp_path / "report"
    out.mkdir()
    ours = [out / ".summary.json.abcdefgh.tmp", out / ".heatmap-3.png.a1b2c3d4.tmp", out / ".layers.csv.zz_zz_zz.tmp"]
    beside = [tmp_path / ".report.q1w2e3r4.tmp", tmp_path / ".report.old-4242"]
    users = [out / ".notes.txt.abcdefgh.tmp", out / ".foo.tmp", out / "summary.json.abcdefgh.tmp", out / "mine.txt"]
    for p in ours + users:
        p.write_text("x")
    for p in beside:
        p.mkdir()
        (p / "summary.json").write_text("old")
    code, _, err = cli("compare", base, tuned, "--out", out, "-q")
    assert code == 0, err
    assert not any(p.exists() for p in ours + beside)
    assert all(p.exists() for p in users)
    assert (out / "summary.json").is_file()


def test_output_lock_file_reentry_and_cleanup(tmp_path):
    out = tmp_path / "new" / "deeper" / "result.bin"
    with output_lock(out):
        lock = lock_file_of(out)
        assert lock == out.parent / ".result.bin.lock"
        assert lock.read_text().startswith(f"{os.getpid()}: ")
        with output_lock(out):  # a CLI command holds it, the library writer it calls takes it again
            pass
        assert lock.exists()
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}, this process"):
            with output_lock(out, reentrant=False):
                pass
    assert not lock.exists()
    assert not (tmp_path / "new").exists(), "folders made only to hold the lock are removed again"
    with output_lock(out):
        out.write_text("written")
    assert out.read_text() == "written" and sorted(p.name for p in out.parent.iterdir()) == ["result.bin"]
    with pytest.raises(RlsubnetError, match="cannot write"):
        with output_lock(out / "under-a-file"):
            pass


def test_python_api_writers_take_the_lock(inputs, tmp_path):
    base, tuned, patch, _ = inputs
    from rlsubnet.masks import build_mask
    from rlsubnet.patch import apply_patches, create_patch

    mask = build_mask(base, tuned, hash_content=False)
    calls = {
        tmp_path / "api.rlpatch": lambda out: create_patch(base, tuned, out),
        tmp_path / "api-out": lambda out: apply_patches(base, [patch], out),
        tmp_path / "api.mask": lambda out: mask.save(out),
    }
    for out, call in calls.items():
        with held_elsewhere(out, "12345: someone else"):
            with pytest.raises(OutputBusyError, match=r"pid 12345: someone else"):
                call(out)
        assert not out.exists()
        call(out)
        assert out.exists()


def test_a_folder_finished_by_an_unlocked_writer_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RlsubnetError, match="created by another run meanwhile"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")  # a writer that ignores locks finished first
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
