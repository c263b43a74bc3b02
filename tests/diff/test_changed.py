"""The one changed-test (rlsubnet.diff.changed) against torch.isclose, and every consumer agreeing with it."""

from __future__ import annotations

import os

import pytest
import torch

import rlsubnet
from rlsubnet.diff.changed import ChangedTest, changed_mask, changed_masks, comparison_dtype
from rlsubnet.diff.dynamics import DecompositionTracker, decompose
from rlsubnet.diff.stats import tensor_stats
from rlsubnet.masks import build_mask

MODES = ("bf16", "fp32", "native")
SPECIAL = [0.0, -0.0, 1e-6, -1e-6, 1e-5, 2e-5, 1.0, -1.0, 3.4e38, float("inf"), float("-inf"), float("nan"), 1e-40]


def _pairs():
    """Every ordered pair of special values, plus random small moves, in float32 and bfloat16."""
    a = torch.tensor([x for x in SPECIAL for _ in SPECIAL], dtype=torch.float32)
    b = torch.tensor([y for _ in SPECIAL for y in SPECIAL], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4000, generator=g) * 0.02
    moved = w + torch.randn(4000, generator=g) * 1e-5
    return {"f32": (torch.cat([a, w]), torch.cat([b, moved])),
            "bf16": (torch.cat([a, w]).bfloat16(), torch.cat([b, moved]).bfloat16())}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("atol", [0.0, 1e-5, 1e-3])
@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_the_test_is_isclose_in_the_comparison_dtype(mode, atol, kind):
    base, tuned = _pairs()[kind]
    cmp_dtype = comparison_dtype(mode, base.dtype, tuned.dtype)
    d = tuned.to(cmp_dtype) - base.to(cmp_dtype)
    want = ~torch.isclose(d, torch.zeros_like(d), atol=atol, rtol=0)
    (got,) = ChangedTest(base.dtype, tuned.dtype, atol, mode).changed(base, tuned)
    assert torch.equal(torch.from_numpy(got), want)


def test_signed_zero_is_zero_and_nan_is_never_equal():
    base = torch.tensor([0.0, -0.0, float("nan"), float("nan"), 1.0])
    tuned = torch.tensor([-0.0, 0.0, float("nan"), 1.0, 1.0])
    for atol in (0.0, -0.0, 1e30):
        assert changed_mask(base, tuned, atol, "fp32").tolist() == [False, False, True, True, False]


def test_non_float_tensors_compare_bitwise_whatever_the_tolerance():
    base = torch.tensor([1, 2, 3, -4], dtype=torch.int32)
    tuned = torch.tensor([1, 3, 3, -4], dtype=torch.int64)
    assert comparison_dtype("bf16", base.dtype, tuned.dtype) == torch.int64
    for atol in (0.0, 10.0):
        assert changed_mask(base, tuned, atol).tolist() == [False, True, False, False]


def test_every_consumer_counts_what_the_test_counts(sharded_pair):
    """compare (DeltaAccumulator), the mask build, the in-memory masks and the decomposition agree to the entry."""
    base_dir, tuned_dir, _, _ = sharded_pair
    with rlsubnet.open_checkpoint(str(base_dir)) as b, rlsubnet.open_checkpoint(str(tuned_dir)) as t:
        base = {n: b.read(n) for n in b.names()}
        tuned = {n: t.read(n) for n in b.names()}
    for mode in MODES:
        r = rlsubnet.compare(base_dir, tuned_dir, atol=(0.0, 1e-5), mode=mode)
        for k, atol in enumerate((0.0, 1e-5)):
            in_memory = sum(int(changed_masks(base[n], tuned[n], (0.0, 1e-5), mode)[k].sum()) for n in base)
            per_tensor = sum(tensor_stats(n, base[n], tuned[n], (atol,), mode).changed[0] for n in base)
            mask = build_mask(base_dir, tuned_dir, atol=atol, mode=mode, hash_content=False)
            final = decompose(base, [tuned], (atol,), mode)[0].final
            assert r.changed(atol) == in_memory == per_tensor == mask.changed == final, (mode, atol)


def test_the_tracker_fed_state_by_state_is_the_snapshot_decomposition():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(50, generator=g).bfloat16(), "b": torch.randn(4, 6, generator=g).bfloat16()}
    states = []
    cur = {n: t.clone() for n, t in base.items()}
    for step in range(5):
        cur = {n: t.clone() for n, t in cur.items()}
        cur["a"].view(-1)[step * 7 : step * 7 + 5] += 0.5
        cur["b"].view(-1)[step] = base["b"].view(-1)[step] if step % 2 else cur["b"].view(-1)[step] + 1
        states.append(cur)
    tracker = DecompositionTracker(base, (0.0, 1e-2))
    for s in states:
        tracker.update(s)
    assert [c.to_record() for c in tracker.counts()] == [c.to_record() for c in decompose(base, states, (0.0, 1e-2))]
    rec = tracker.counts()[0]
    assert rec.never + rec.returned + rec.final == rec.numel == 74


def test_the_mode_keyword_and_its_old_name(sharded_pair):
    base, tuned, _, _ = sharded_pair
    new = rlsubnet.compare(base, tuned, mode="fp32")
    with pytest.warns(DeprecationWarning, match="mode="):
        old = rlsubnet.compare(base, tuned, dtype="fp32")
    assert new.to_json() == old.to_json() and new.mode == "fp32"
    assert new.to_json()["options"]["dtype"] == "fp32"  # the key files have always used
    with pytest.raises(TypeError, match="colour"):
        rlsubnet.compare(base, tuned, colour="fp32")
    with pytest.raises(rlsubnet.UsageError, match="unknown comparison mode 'fp8'"):
        rlsubnet.compare(base, tuned, mode="fp8")


def test_changed_mask_defaults_mode_and_integers():
    base = torch.tensor([1.0, 1.0, 1.0])
    tuned = torch.tensor([1.0 + 2**-6, 1.0 + 2**-12, 1.0])
    assert changed_mask(base, tuned).tolist() == [True, False, False]  # default: atol 1e-5 in bf16
    assert changed_mask(base, tuned, 1e-5, "fp32").tolist() == [True, True, False]  # fp32 sees the small step
    ids_b, ids_t = torch.tensor([1, 2, 3]), torch.tensor([1, 7, 3])
    assert changed_mask(ids_b, ids_t, 10.0).tolist() == [False, True, False]  # integers: bitwise, atol ignored
    with pytest.raises(ValueError, match=r"^shapes differ: \[3\] vs \[2\]$"):
        changed_mask(base, tuned[:2])


def test_defaults_and_float8():
    """The test's default tolerance, and float8 (no arithmetic in torch) compared in bfloat16, which holds it."""
    assert ChangedTest(torch.bfloat16, torch.bfloat16).atols == (1e-5,)
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert comparison_dtype("native", f8, f8) == torch.bfloat16
        # torch promotes float8 with nothing: it enters as bfloat16 (bf16 with fp16 is fp32)
        assert comparison_dtype("native", f8, torch.float16) == torch.float32
        assert comparison_dtype("native", torch.bfloat16, f8) == torch.bfloat16
        assert comparison_dtype("bf16", torch.int64, f8) == torch.bfloat16
    base = torch.tensor([1.0, 2.0, 0.5]).to(torch.float8_e4m3fn)
    tuned = torch.tensor([1.0, 2.5, 0.5]).to(torch.float8_e4m3fn)
    assert changed_mask(base, tuned, 0.0, "native").tolist() == [False, True, False]
    r = rlsubnet.compare({"w": base}, {"w": tuned.to(torch.bfloat16)}, atol=0.0, mode="native")
    assert r.changed(0.0) == 1


def test_the_old_keyword_warns_in_words():
    with pytest.warns(DeprecationWarning) as caught:
        changed_mask(torch.zeros(2), torch.ones(2), 0.0, dtype="fp32")
    assert [str(w.message) for w in caught] == ["the comparison mode is passed as mode=...; dtype=... is deprecated"]
    # its stacklevel names the caller's line; under `make mutate` mutmut's trampolines add frames in between
    assert "MUTANT_UNDER_TEST" in os.environ or caught[0].filename == __file__
