"""Signed zero and absurd numbers: −0.0 is a tolerance of 0 everywhere, no cache hands out a threshold computed
for another bit pattern, and numeric options outside their range are one-line usage errors naming the option."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import rlsubnet
from rlsubnet.diff import changed as changed_test
from rlsubnet.diff.changed import changed_mask, changed_masks
from rlsubnet.errors import UsageError
from rlsubnet.masks import (
    Mask,
    build_mask,
    overlap_many,
    random_mask,
)

MODES = ("bf16", "fp32", "native")


def _numel(path) -> int:
    with rlsubnet.open_checkpoint(str(path)) as ck:
        return ck.numel


@pytest.mark.parametrize("mode", MODES)
def test_negative_zero_atol_counts_what_changed_bitwise(sharded_pair, mode):
    """The pair's tuned side differs from the base by one bf16 ULP in exactly `changed` entries: at atol −0.0,
    as at 0, exactly those count as changed, in every comparison dtype (bf16 → fp32 is exact)."""
    base, tuned, changed, _ = sharded_pair
    n = _numel(base)
    changed_test._threshold_bits.cache_clear()
    neg = rlsubnet.compare(base, tuned, atol=-0.0, mode=mode)
    assert neg.atols == (0.0,) and math.copysign(1.0, neg.atols[0]) == 1.0  # recorded as +0.0
    assert neg.global_stats[0]["changed"] == changed
    assert neg.density(0.0) == pytest.approx(changed / n)
    mask = build_mask(base, tuned, atol=-0.0, mode=mode, hash_content=False)
    assert mask.changed == changed and math.copysign(1.0, mask.atol) == 1.0


@pytest.mark.parametrize("first", [-0.0, 0.0])
def test_no_cached_threshold_crosses_signed_zeros(sharded_pair, first):
    """Whichever zero comes first in a process, the other gets the same, correct threshold (the cache used to
    key −0.0 and 0.0 together and hand −0.0's sign bit to every later atol-0 comparison)."""
    base, tuned, changed, _ = sharded_pair
    changed_test._threshold_bits.cache_clear()
    for atol in (first, -first):
        assert rlsubnet.compare(base, tuned, atol=atol).global_stats[0]["changed"] == changed
        assert build_mask(base, tuned, atol=atol, hash_content=False).changed == changed
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert changed_test.threshold_bits(-0.0, dt) == 0 == changed_test.threshold_bits(0.0, dt)
        assert changed_test.atol_threshold(-0.0, dt) == 0.0 and math.copysign(1.0, changed_test.atol_threshold(-0.0, dt)) == 1.0
    # a non-zero tolerance is still its own threshold: bf16 1e-5 rounds to 0x3728 (1.0014e-5)
    assert changed_test.threshold_bits(1e-5, torch.bfloat16) == 0x3728


def test_negative_zero_in_the_in_memory_changed_tests():
    b = torch.tensor([1.0, 2.0, -0.0, 0.5], dtype=torch.bfloat16)
    t = torch.tensor([1.0, 2.015625, 0.0, 0.5], dtype=torch.bfloat16)  # one bf16 ULP up at 2; −0 → +0 is no change
    want = [False, True, False, False]
    assert changed_masks(b, t, [-0.0])[0].tolist() == want
    assert changed_mask(b, t, atol=-0.0).tolist() == want


def test_cli_negative_zero(sharded_pair, tmp_path, cli):
    base, tuned, changed, _ = sharded_pair
    code, out, err = cli("compare", base, tuned, "--atol", "-0.0", "0", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert [g["atol"] for g in doc["global"]] == [0.0] and doc["global"][0]["changed"] == changed
    assert "-0.0" not in out
    code, out, err = cli("mask", base, tuned, "--atol", "-0.0", "-o", tmp_path / "m.mask", "--no-hash", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["changed"] == changed == Mask.load(tmp_path / "m.mask").changed


# Every numeric option of every command, out of range or not a number: refused while parsing, in one line.
BAD_OPTIONS = [
    (["compare", "b", "t", "--atol", "nan"], "--atol must be a finite, non-negative number"),
    (["compare", "b", "t", "--atol", "inf"], "--atol must be a finite, non-negative number"),
    (["compare", "b", "t", "--atol", "1e400"], "--atol must be a finite, non-negative number"),
    (["compare", "b", "t", "--atol", "0", "-1e-5"], "--atol must be a finite, non-negative number, got -1e-05"),
    (["compare", "b", "t", "--atol", "one"], "--atol must be a number, got 'one'"),
    (["compare", "b", "t", "--atol", *[f"{k}e-9" for k in range(1, 66)]], "at most 64 distinct atols, got 65"),
    (["mask", "b", "t", "-o", "m", "--atol", "-1"], "--atol must be a finite, non-negative number"),
    (["mask", "--random", "m", "-o", "r", "--seed", "-1"], "--seed must be a non-negative integer below 2**63, got -1"),
    (["mask", "--random", "m", "-o", "r", "--seed", str(2**63)], "--seed must be a non-negative integer below 2**63"),
    (["mask", "--random", "m", "-o", "r", "--seed", "1.5"], "--seed must be a non-negative integer below 2**63"),
    (["mask", "--random", "m", "-o", "r", "--density", "1.5"], "--density must be in [0, 1], got 1.5"),
    (["mask", "--random", "m", "-o", "r", "--density", "nan"], "--density must be in [0, 1], got nan"),
    (["overlap", "a", "b", "--bins-per-octave", "0"], "--bins-per-octave must be at least 1, got 0"),
    (["overlap", "a", "b", "--bins-per-octave", "1000000000000"], "--bins-per-octave must be at most 128"),
    (["patch", "create", "b", "t", "-o", "p", "--level", "0"], "--level must be at least 1, got 0"),
    (["patch", "create", "b", "t", "-o", "p", "--level", "23"], "--level must be at most 22, got 23"),
    (["train", "grpo", "--base", "b", "--out", "o", "--lr", "nan"], "--lr must be a finite, positive number"),
    (["train", "grpo", "--base", "b", "--out", "o", "--lr", "0"], "--lr must be a finite, positive number"),
    (["train", "grpo", "--base", "b", "--out", "o", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train", "grpo", "--base", "b", "--out", "o", "--batch-size", "10000000000"], "--batch-size must be at most 65536"),
    (["train", "grpo", "--base", "b", "--out", "o", "--num-generations", "1"], "--num-generations must be at least 2"),
    (["train", "grpo", "--base", "b", "--out", "o", "--steps", "-5"], "--steps must be at least 1"),
    (["train", "grpo", "--base", "b", "--out", "o", "--seed", str(2**64)], "--seed must be a non-negative integer"),
    (["train", "grpo", "--base", "b", "--out", "o", "--data-seed", "-1"], "--data-seed must be a non-negative integer"),
    (["train", "grpo", "--base", "b", "--out", "o", "--max-grad-norm", "-inf"], "--max-grad-norm must be a finite"),
    (["train", "grpo", "--base", "b", "--out", "o", "--weight-decay", "nan"], "--weight-decay must be a finite"),
    (["train", "grpo", "--base", "b", "--out", "o", "--snapshot-every", "0"], "--snapshot-every must be at least 1"),
    (["demo", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["demo", "--threads", "100000"], "--threads must be at most 1024"),
    (["demo", "--jobs", "100000"], "--jobs must be at most 256"),
    (["demo", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["demo", "--batch-size", "99999999"], "--batch-size must be at most 65536"),
    (["demo", "--rl-lr", "inf"], "--rl-lr must be a finite, positive number"),
    (["demo", "--kl-beta", "-1"], "--kl-beta must be a finite, non-negative number"),
    (["demo", "--pretrain-target", "1.5"], "--pretrain-target must be in [0, 1]"),
    (["demo", "--pretrain-max-steps", "0"], "--pretrain-max-steps must be at least 1"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=[" ".join(a)[:60] for a, _ in BAD_OPTIONS])
def test_numeric_options_out_of_range_are_one_line_usage_errors(cli, expect_error, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # nothing named b, t, m... exists: the option must be refused before any input is read
    code, _, err = cli(*argv)
    expect_error(code, err, message)
    assert not any(tmp_path.iterdir()), "nothing may be written"


def _api_calls(base, tuned, mask):
    from rlsubnet.checkpoint.hashing import hash_checkpoint
    from rlsubnet.lab.pipeline import DemoConfig
    from rlsubnet.lab.stages import StageSpec
    from rlsubnet.patch import apply_patches, create_patch

    def hash_with_no_threads():
        with rlsubnet.open_checkpoint(str(base)) as ck:
            hash_checkpoint(ck, threads=0)

    spec = {"name": "s", "algorithm": "sft", "task": "add", "data": "gold", "learning_rate": 1e-5, "steps": 2}
    return [
        (lambda: rlsubnet.compare(base, tuned, block_bytes=0), "block_bytes must be at least 1"),
        (lambda: rlsubnet.compare(base, tuned, block_bytes=1 << 40), "block_bytes must be at most 1073741824"),
        (lambda: rlsubnet.compare(base, tuned, atol=float("nan")), "atol must be a finite, non-negative number"),
        (lambda: rlsubnet.compare(base, tuned, atol="1e-5"), "atol must be a number"),
        (lambda: build_mask(base, tuned, block_bytes=-1), "block_bytes must be at least 1"),
        (lambda: build_mask(base, tuned, atol=-1e-5), "atol must be a finite, non-negative number"),
        (lambda: random_mask(mask, seed=2**63), "seed must be a non-negative integer below 2**63"),
        (lambda: random_mask(mask, density=float("nan")), "density must be in [0, 1]"),
        (lambda: random_mask({"w": (-4, 4)}, density=0.5), "shape of 'w' must be at least 0, got -4"),
        (lambda: random_mask({"w": (2.5,)}, density=0.5), "shape of 'w' must be an integer, got 2.5"),
        (lambda: overlap_many([mask, mask], bins_per_octave=10**9), "bins_per_octave must be at most 128"),
        (lambda: overlap_many([mask, mask], bins_per_octave=1.5), "bins_per_octave must be an integer"),
        (lambda: create_patch(base, tuned, base.parent / "p.rlpatch", level=99), "level must be at most 22"),
        (lambda: apply_patches(base, [base.parent / "p.rlpatch"], base.parent / "o", read_bytes=0), "read_bytes must be at least 1"),
        (hash_with_no_threads, "threads must be at least 1"),
        (lambda: StageSpec(**spec | {"batch_size": 10**9}), "--batch-size must be at most 65536"),
        (lambda: StageSpec(**spec | {"seed": -1}), "seed must be a non-negative integer"),
        (lambda: StageSpec(**spec | {"max_grad_norm": float("nan")}), "--max-grad-norm must be a finite"),
        (lambda: DemoConfig(size="micro", threads=0), "--threads must be at least 1"),
        (lambda: DemoConfig(size="micro", seed=2**63), "--seed must be a non-negative integer"),
    ]


def test_public_functions_range_check_their_numbers(sharded_pair, tmp_path):
    base, tuned, _, _ = sharded_pair
    mask = Mask.from_bool({"w": np.ones(16, dtype=bool)})
    for call, message in _api_calls(base, tuned, mask):
        with pytest.raises(UsageError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    assert not (base.parent / "p.rlpatch").exists() and not (base.parent / "o").exists()
    # the edges of the ranges are accepted
    assert random_mask(mask, seed=2**63 - 1, density=1.0).changed == 16
    assert rlsubnet.compare(base, tuned, atol=[1e-9 * k for k in range(1, 65)]).atols[-1] == 64e-9


def test_running_out_of_memory_is_one_line(sharded_pair, cli, expect_error, monkeypatch):
    import rlsubnet.engine

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(rlsubnet.engine, "compare_many", too_big)
    code, _, err = cli("compare", *sharded_pair[:2])
    expect_error(code, err, "out of memory")
