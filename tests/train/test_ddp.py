"""Masked training under DistributedDataParallel: two CPU processes (torchrun, gloo).

Checks: frozen entries are bit-identical to their initial values on every rank; both ranks hold bit-identical
parameters; and the DDP result agrees with a single process trained on the same global batches.

Tolerance of that agreement: DDP averages the two ranks' gradients (sum of two fp32 partial means, then / 2)
while the single process reduces all 16 rows in one backward, so gradients differ in the last bits (~1e-7
relative). Adam divides by sqrt(v), which turns that into update differences up to ~1e-5 relative for entries
whose gradients are tiny. Measured over 8 steps at lr 1e-2: worst entry 5.2e-7, 16 of 2,896 entries above
1e-7, while a trained entry moves by 0.015 (median). We allow 1e-5 absolute: 20x the measured rounding, and
1/1500 of a typical movement, so a wrong data split, a missing all-reduce or an unmasked rank (differences of
order lr) cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ATOL = 1e-5


def _bits(t):
    return t.view(torch.int32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), "--out", str(out)]
    single = [sys.executable, str(WORKER), "--single", "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in (torchrun, single)]
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-4000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ("rank0", "rank1", "single")}


@pytest.mark.parametrize("variant", ["bucket_view_false", "bucket_view_true"])
def test_ddp_frozen_entries_and_agreement(runs, variant):
    r0, r1, single = runs["rank0"], runs["rank1"], runs["single"]
    assert r0["world"] == r1["world"] == 2 and single["world"] == 1
    initial, mask = r0["initial"], r0["mask"]
    worst = 0.0
    for name, init in initial.items():
        trainable = mask[name]
        for run in (r0, r1, single):
            final = run[variant][name]
            # frozen entries: bit-identical on every rank (and in the single run)
            assert torch.equal(_bits(final)[~trainable], _bits(init)[~trainable]), name
        # ranks agree bit for bit everywhere
        assert torch.equal(_bits(r0[variant][name]), _bits(r1[variant][name])), name
        if trainable.any():
            assert not torch.equal(r0[variant][name][trainable], init[trainable]), f"{name}: nothing trained"
        worst = max(worst, (r0[variant][name] - single[variant][name]).abs().max().item())
    assert worst <= ATOL, f"DDP vs single process: max |Δ| = {worst:.3g}"
    print(f"{variant}: DDP vs single max |Δ| = {worst:.3g}")
