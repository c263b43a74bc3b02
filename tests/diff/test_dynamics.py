"""The per-entry views of rlsubnet.diff.dynamics on hand-made tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from rlsubnet.diff.changed import changed_mask
from rlsubnet.diff.dynamics import (
    DynamicsCounts,
    bf16_half_ulp,
    decompose,
    decompose_tensor,
    magnitude_edges,
    magnitude_profile,
)
from rlsubnet.engine import compare

BF = torch.bfloat16


def ulp_up(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """x moved up by k bf16 steps (bit pattern + k for positive values)."""
    return (x.to(BF).view(torch.int16) + k).view(BF)


def test_changed_mask_matches_the_engine_count_for_count():
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(64, 48, generator=g) * 0.02).to(BF)
    tuned = base.clone()
    flat = tuned.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:700]
    flat[idx[:300]] = ulp_up(flat[idx[:300]])  # one ULP: some fall under atol 1e-5, some not
    flat[idx[300:]] = flat[idx[300:]] + 0.01  # large changes
    for atol in (0.0, 1e-6, 1e-5, 1e-3):
        for mode in ("bf16", "fp32"):
            mine = int(changed_mask(base, tuned, atol, mode).sum())
            r = compare({"w": base}, {"w": tuned}, atol=atol, mode=mode)
            assert mine == r.changed(atol), (atol, mode)


def test_changed_mask_edge_cases():
    base = torch.tensor([1.0, 0.001, 0.0, -0.0, float("nan"), 2.0]).to(BF)
    tuned = base.clone()
    tuned[1] = ulp_up(base[1:2])[0]  # 0.001 + 2^-17 (7.6e-6): changed bitwise, hidden by atol 1e-5
    tuned[2] = -0.0  # ±0 are equal
    tuned[5] = 2.0 + 2**-6  # one bf16 step at 2.0
    assert changed_mask(base, tuned, 0.0).tolist() == [False, True, False, False, True, True]
    assert changed_mask(base, tuned, 1e-5).tolist() == [False, False, False, False, True, True]
    with pytest.raises(ValueError):
        changed_mask(base, tuned[:3], 0.0)


def test_decomposition_of_hand_made_snapshots():
    """Six entries, three snapshots (the last is the final model):
    e0 never changes; e1 changes at s1 and returns at s2; e2 changes at s2 only and stays; e3 changes at s1 and
    stays (with a different value at s3); e4 changes only at s3; e5 changes at s1, returns at s2, changes at s3."""
    base = torch.tensor([0.5, 0.25, 0.125, 1.0, 0.75, 0.375]).to(BF)
    u = lambda i, k=1: ulp_up(base[i : i + 1], k)[0]  # noqa: E731
    s1 = base.clone(); s1[1] = u(1); s1[3] = u(3); s1[5] = u(5)
    s2 = base.clone(); s2[2] = u(2); s2[3] = u(3)
    s3 = base.clone(); s3[2] = u(2); s3[3] = u(3, 2); s3[4] = u(4); s3[5] = u(5, 3)
    (c,) = decompose_tensor(base, [s1, s2, s3], atols=(0.0,))
    assert (c.numel, c.never, c.returned, c.final) == (6, 1, 1, 4)
    rec = c.to_record()
    assert rec["ever"] == 5
    assert math.isclose(rec["never_share"] + rec["returned_share"] + rec["final_share"], 1.0)
    assert math.isclose(rec["returned_share_of_ever"], 1 / 5)
    # A change visible at s1 only disappears when s1 is not among the snapshots: resolution matters.
    (coarse,) = decompose_tensor(base, [s2, s3], atols=(0.0,))
    assert (coarse.never, coarse.returned, coarse.final) == (2, 0, 4)


def test_decomposition_under_a_tolerance_and_pooled_over_tensors():
    # Around 0.001 one bf16 step is 2^-17 ≈ 7.6e-6 (under atol 1e-5); two steps are over it.
    a = torch.full((4,), 0.001).to(BF)
    b = torch.full((2,), 0.5).to(BF)
    s1 = {"a": ulp_up(a, 1), "b": ulp_up(b, 1)}  # a: small moves; b: moves of 2^-9 > 1e-5
    s2 = {"a": ulp_up(a, 2), "b": b.clone()}  # a: now over 1e-5; b: back to θ0
    at0, at5 = decompose({"a": a, "b": b}, [s1, s2], atols=(0.0, 1e-5))
    assert (at0.numel, at0.never, at0.returned, at0.final) == (6, 0, 2, 4)
    assert (at5.never, at5.returned, at5.final) == (0, 2, 4)
    s2_small = {"a": ulp_up(a, 1), "b": b.clone()}
    _, at5 = decompose({"a": a, "b": b}, [s1, s2_small], atols=(0.0, 1e-5))
    assert (at5.never, at5.returned, at5.final) == (4, 2, 0)
    with pytest.raises(KeyError):
        decompose({"a": a, "b": b}, [{"a": a}], atols=(0.0,))
    with pytest.raises(ValueError):
        decompose_tensor(a, [], atols=(0.0,))


def test_counts_add_up():
    total = DynamicsCounts(atol=0.0)
    total.add(DynamicsCounts(atol=0.0, numel=10, never=7, returned=1, final=2))
    total.add(DynamicsCounts(atol=0.0, numel=5, never=5))
    assert (total.numel, total.never, total.returned, total.final, total.ever) == (15, 12, 1, 2, 3)


def test_magnitude_profile_known_buckets():
    edges = magnitude_edges(-10, -6)  # 0, 2^-10, …, 2^-6, inf
    base = torch.tensor([0.0, 0.0015, 0.0016, 0.003, 0.02, 0.5]).to(BF)
    tuned = base.clone()
    tuned[1] = ulp_up(base[1:2])[0]  # in [2^-10, 2^-9): changed bitwise, hidden at 1e-5
    tuned[3] = ulp_up(base[3:4])[0]  # in [2^-9, 2^-8): one step is 2^-16 ≈ 1.5e-5 > 1e-5
    tuned[5] = 0.25
    prof = magnitude_profile({"w": base}, {"w": tuned}, atols=(0.0, 1e-5), edges=edges).to_record()
    rows = {(r["lo"], r["hi"]): r for r in prof["buckets"]}
    assert rows[(0.0, 2**-10)]["numel"] == 1 and rows[(0.0, 2**-10)]["p_changed"]["0.0"] == 0.0
    b = rows[(2**-10, 2**-9)]
    assert b["numel"] == 2 and b["p_changed"]["0.0"] == 0.5 and b["p_changed"]["1e-05"] == 0.0
    assert rows[(2**-9, 2**-8)]["p_changed"]["1e-05"] == 1.0
    assert rows[(2**-6, None)]["numel"] == 2 and rows[(2**-6, None)]["p_changed"]["0.0"] == 0.5
    assert sum(r["numel"] for r in prof["buckets"]) == base.numel()


def test_bf16_half_ulp():
    assert bf16_half_ulp(1.0) == 2**-8
    assert bf16_half_ulp(0.02) == 2**-6 * 2**-7 / 2
    assert bf16_half_ulp(0.0) > 0
