"""One micro demo per test session, shared by the end-to-end and determinism tests (it takes ~20 s)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

pytest.importorskip("trl")

# RL lr 1e-4: at the default 1e-6, 4 steps of the micro model change no bf16 entry, so there would be no subnetwork
# to re-run. One job: the stages run in this process (the resume test patches run_stage); test_subnetwork.py runs
# the worker-process path.
MICRO_ARGS = ["--size", "micro", "--steps", "4", "--rl-lr", "1e-4", "--jobs", "1", "-q"]


@pytest.fixture(scope="session")
def micro_args():
    return list(MICRO_ARGS)


@pytest.fixture(scope="session")
def micro_demo(tmp_path_factory):
    """(out_dir, results) of `rlsubnet demo --size micro` run once through the CLI."""
    import json

    from rlsubnet.cli.main import main

    out = tmp_path_factory.mktemp("demo") / "micro"
    rc = main(["demo", "--out", str(out), *MICRO_ARGS])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())
