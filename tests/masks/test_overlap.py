"""Overlap figures and both chance baselines on constructed masks with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlsubnet.errors import UsageError
from rlsubnet.masks import Mask, MaskMismatchError, overlap, overlap_many, random_mask
from rlsubnet.masks.overlap import bucket_bounds, bucket_index


def _flags(n, ones):
    t = torch.zeros(n, dtype=torch.bool)
    t[list(ones)] = True
    return t


def test_known_overlap_and_density_chance():
    # n = 100; A = 0..39 (40), B = 20..69 (50): |A∩B| = 20, |A∪B| = 70
    a = Mask.from_bool({"w": _flags(100, range(0, 40))})
    b = Mask.from_bool({"w": _flags(100, range(20, 70))})
    p = overlap(a, b)
    assert p.intersection == 20
    assert p.o1 == 20 / 40 and p.o2 == 20 / 50 and p.jaccard == 20 / 70
    assert p.chance_o1 == 0.5 and p.chance_o2 == 0.4  # the other mask's density
    expected = 100 * 0.4 * 0.5
    assert p.chance_jaccard == pytest.approx(expected / (90 - expected))
    assert "magnitude_chance_o1" not in p.figures  # needs the base


def test_magnitude_matched_chance_known_answer():
    # 100 weights: 50 small (|w| = 1/64), 50 large (|w| = 1/2). Both masks only touch small weights:
    # A = small[0:30], B = small[20:50]. Observed |A∩B| = 10.
    # Density chance: o1 = d_B = 30/100. Magnitude-matched: p_A = p_B = 30/50 in the small bucket, 0 in the
    # large one, so E|A∩B| = 50 · 0.6 · 0.6 = 18 and chance o1 = 18/30 = 0.6, chance o2 = 18/30.
    w = torch.cat([torch.full((50,), 1 / 64), torch.full((50,), -0.5)]).to(torch.bfloat16)
    a = Mask.from_bool({"w": _flags(100, range(0, 30))})
    b = Mask.from_bool({"w": _flags(100, range(20, 50))})
    p = overlap(a, b, base={"w": w})
    assert p.o1 == 10 / 30 and p.chance_o1 == 0.3
    assert p.expected_intersection_magnitude == pytest.approx(18.0)
    assert p.magnitude_chance_o1 == pytest.approx(0.6) and p.magnitude_chance_o2 == pytest.approx(0.6)
    assert p.magnitude_chance_jaccard == pytest.approx(18 / (60 - 18))
    rows = {r["bucket"]: r for r in p.buckets}
    assert len(rows) == 2
    small = next(r for r in p.buckets if r["abs_w_lo"] <= 1 / 64 < r["abs_w_hi"])
    assert small["numel"] == 50 and small["density_a"] == 0.6 and small["intersection"] == 10
    assert small["expected_intersection"] == pytest.approx(18.0)


def test_one_bucket_reduces_to_the_density_baseline():
    g = torch.Generator().manual_seed(1)
    a = Mask.from_bool({"w": torch.rand(1000, generator=g) < 0.2})
    b = Mask.from_bool({"w": torch.rand(1000, generator=g) < 0.4})
    p = overlap(a, b, base={"w": torch.full((1000,), 0.3)})
    assert p.magnitude_chance_o1 == pytest.approx(p.chance_o1)
    assert p.magnitude_chance_o2 == pytest.approx(p.chance_o2)


def test_per_layer_and_per_module_rows():
    q0, up0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    a = Mask.from_bool({q0: _flags(10, range(0, 4)), up0: _flags(10, range(0, 10)), q1: _flags(10, [])})
    b = Mask.from_bool({q0: _flags(10, range(2, 6)), up0: _flags(10, range(0, 5)), q1: _flags(10, range(0, 10))})
    p = overlap(a, b)
    layers = {r["layer"]: r for r in p.layers}
    # layer 0: |A| = 14, |B| = 9, |A∩B| = 2 + 5 = 7, n = 20
    assert layers[0]["intersection"] == 7 and layers[0]["o1"] == 7 / 14 and layers[0]["o2"] == 7 / 9
    assert layers[0]["chance_o1"] == 9 / 20 and layers[0]["chance_o2"] == 14 / 20
    assert layers[1]["o1"] is None and layers[1]["o2"] == 0.0  # A is empty in layer 1
    modules = {r["module"]: r for r in p.modules}
    # q: |A| = 4, |B| = 14, |A∩B| = 2, n = 20
    assert modules["q"]["o1"] == 2 / 4 and modules["q"]["o2"] == 2 / 14 and modules["q"]["chance_o1"] == 14 / 20
    assert modules["up"]["o1"] == 5 / 10 and modules["up"]["jaccard"] == 5 / 10
    # global: |A| = 14, |B| = 19, |A∩B| = 7, n = 30
    assert p.o1 == 7 / 14 and p.o2 == 7 / 19 and p.chance_o1 == 19 / 30


def test_matrix_for_many_masks():
    a = Mask.from_bool({"w": _flags(8, [0, 1, 2, 3])})
    b = Mask.from_bool({"w": _flags(8, [2, 3, 4, 5, 6, 7])})
    c = Mask.from_bool({"w": _flags(8, [0, 7])})
    r = overlap_many([a, b, c], ["A", "B", "C"])
    assert [(p.a, p.b) for p in r.pairs] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert r.matrix_o1[0][1] == 2 / 4 and r.matrix_o1[1][0] == 2 / 6
    assert r.matrix_o1[0][2] == 1 / 4 and r.matrix_o1[2][0] == 1 / 2
    assert r.matrix_chance_o1[0][1] == 6 / 8 and r.matrix_chance_o1[1][0] == 4 / 8
    assert all(r.matrix_o1[i][i] == 1.0 for i in range(3))
    assert r.pair("B", "C").o1 == 1 / 6


def test_independent_random_masks_sit_at_chance():
    like = {"w": (200, 500)}
    a = random_mask(like, density=0.2, seed=1)
    b = random_mask(like, density=0.3, seed=2)
    p = overlap(a, b)
    # o1 ~ d_B with sd sqrt(d_B (1 - d_B) / |A|) ≈ 0.0023 for |A| = 20,000
    assert abs(p.o1 - p.chance_o1) < 0.012 and abs(p.o2 - p.chance_o2) < 0.012


def test_magnitude_explains_overlap_of_magnitude_driven_masks():
    """Two masks that each pick small weights independently: far above the density chance, at the
    magnitude-matched chance. This is the effect the second baseline exists to expose."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(50_000, generator=g) * 0.02
    small = w.abs() < 0.004
    a = Mask.from_bool({"w": small & (torch.rand(50_000, generator=g) < 0.8)})
    b = Mask.from_bool({"w": small & (torch.rand(50_000, generator=g) < 0.7)})
    p = overlap(a, b, base={"w": w.to(torch.bfloat16)}, bins_per_octave=4)
    assert p.o1 > 3 * p.chance_o1
    # a bucket straddling the 0.004 cut mixes picked and unpicked weights; finer buckets get closer
    assert abs(p.o1 - p.magnitude_chance_o1) < 0.05


def test_bucket_index():
    w = torch.tensor([1.0, 0.75, -0.5, 0.0, float("inf"), float("nan"), 2.0 ** -20, 1.5])
    idx = bucket_index(w).tolist()
    assert idx[3] == 0 and idx[4] == 1 and idx[5] == 1
    assert idx[0] == idx[7]  # 1.0 and 1.5 share [1, 2)
    assert idx[1] == idx[2] != idx[0]  # 0.75 and 0.5 share [0.5, 1)
    lo, hi, _ = bucket_bounds(idx[0], 1)
    assert (lo, hi) == (1.0, 2.0)
    lo, hi, _ = bucket_bounds(idx[6], 1)
    assert lo <= 2.0 ** -20 < hi
    fine = bucket_index(torch.tensor([1.0, 1.4, 1.42, 1.9]), bins_per_octave=2).tolist()
    assert fine[0] == fine[1] != fine[2] == fine[3]  # split at sqrt(2) ≈ 1.4142
    lo, hi, _ = bucket_bounds(fine[2], 2)
    assert lo == pytest.approx(math.sqrt(2)) and hi == pytest.approx(2.0)


def test_mismatches_are_errors():
    a = Mask.from_bool({"w": _flags(8, [1])})
    b = Mask.from_bool({"v": _flags(8, [1])})
    with pytest.raises(MaskMismatchError, match="A vs B"):
        overlap(a, b, labels=("A", "B"))
    with pytest.raises(MaskMismatchError, match="missing from the base"):
        overlap(a, a, base={"x": torch.zeros(8)})
    with pytest.raises(MaskMismatchError, match="different shapes"):
        overlap(a, a, base={"w": torch.zeros(2, 4)})
    with pytest.raises(UsageError):
        overlap_many([a])


def test_mixed_settings_and_foreign_base_are_flagged(sharded_pair):
    from rlsubnet.masks import build_mask

    base, tuned, _, _ = sharded_pair
    m5 = build_mask(base, tuned, atol=1e-5)
    m0 = build_mask(base, tuned, atol=0.0)
    r = overlap_many([m5, m0], ["a", "b"], base=base)
    assert any("different atol" in w for w in r.warnings)
    assert not any("different weights" in w for w in r.warnings)
    r2 = overlap_many([m5, m0], ["a", "b"], base=tuned)  # the wrong base: same layout, other weights
    assert any("different weights" in w for w in r2.warnings)
    for m in (m5, m0):  # hashes recorded under another scheme (older masks: SHA-256) are not compared
        m.meta["base"] = dict(m.meta["base"], content_hash_scheme="sha256-tensors-v1", content_hash="ab" * 32)
    r3 = overlap_many([m5, m0], ["a", "b"], base=base)
    assert not any("different weights" in w for w in r3.warnings)


@pytest.mark.parametrize("k", [1, 3])
def test_bucket_index_matches_log2_definition(k):
    """Bit-pattern buckets equal floor(k · log2|w|) computed in float64 (offset), for normal values."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20_000, generator=g) * torch.exp(torch.randn(20_000, generator=g) * 8)
    w = w[(w.abs() > 2.0 ** -120) & (w.abs() < 2.0 ** 120)]
    idx = torch.from_numpy(bucket_index(w, k))
    ref = torch.floor(torch.log2(w.double().abs()) * k).long()
    assert torch.equal(idx - idx[0], ref - ref[0])
    for i in idx.unique().tolist()[:50]:
        lo, hi, _ = bucket_bounds(i, k)
        members = w.abs()[idx == i].double()
        assert (members >= lo * (1 - 1e-12)).all() and (members < hi * (1 + 1e-12)).all()
    tiny = torch.tensor([1e-40, -1e-44, 0.0, -0.0])
    assert bucket_index(tiny, k).tolist() == [2, 2, 0, 0]


def test_many_masks_take_the_other_counting_path():
    """More than 8 masks are counted per mask and per pair; the figures must equal the pattern path's."""
    like = {"w": (40, 50), "v": (7,)}
    masks = [random_mask(like, density=0.1 + 0.05 * i, seed=i) for i in range(9)]
    base = {"w": torch.randn(40, 50, generator=torch.Generator().manual_seed(0)), "v": torch.ones(7)}
    many = overlap_many(masks, [str(i) for i in range(9)], base=base)
    for p in many.pairs[:6]:
        i, j = int(p.a), int(p.b)
        two = overlap(masks[i], masks[j], base=base)
        assert p.figures == two.figures
        assert p.modules == two.modules and p.buckets == two.buckets


def test_empty_and_full_masks_are_flagged_not_silent():
    a = Mask.from_bool({"w": _flags(10, [])})
    b = Mask.from_bool({"w": _flags(10, range(3))})
    c = Mask.from_bool({"w": _flags(10, range(10))})
    r = overlap_many([a, b, c], labels=["empty", "some", "all"])
    assert any("empty is empty (density 0)" in w for w in r.warnings)
    assert any("all holds every parameter (density 1)" in w for w in r.warnings)
    assert overlap(a, b).o1 is None and overlap(b, c).o1 == 1.0
