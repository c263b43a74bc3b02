"""Overlap figures and both chance baselines on constructed masks with answers worked out by hand."""

from __future__ import annotations

import math
import os

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


def test_group_magnitude_chance_estimates_bucket_probabilities_within_the_group():
    """Two layers of one module kind, every |w| in one bucket. Layer 0: A and B pick 5 of 10 each, so p_A = p_B =
    1/2 there and E|A∩B| = 10 · 1/2 · 1/2 = 2.5: magnitude chance o1 = 2.5 / 5 = 0.5. Layer 1: A picks 5, B 7:
    E = 10 · 0.5 · 0.7 = 3.5, o1 = 0.7, o2 = 0.5. Probabilities pooled over both layers (A 10/20, B 12/20) would
    give 0.6 in both layer rows; that is the right answer only for the module row, which pools them."""
    l0, l1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    a = Mask.from_bool({l0: _flags(10, range(0, 5)), l1: _flags(10, range(0, 5))})
    b = Mask.from_bool({l0: _flags(10, range(3, 8)), l1: _flags(10, range(2, 9))})
    base = {l0: torch.full((10,), 1.5), l1: torch.full((10,), -1.25)}  # one binade: [1, 2)
    p = overlap(a, b, base=base)
    layers = {r["layer"]: r for r in p.layers}
    assert layers[0]["expected_intersection_magnitude"] == pytest.approx(2.5)
    assert layers[0]["magnitude_chance_o1"] == pytest.approx(0.5) and layers[0]["magnitude_chance_o2"] == pytest.approx(0.5)
    assert layers[1]["expected_intersection_magnitude"] == pytest.approx(3.5)
    assert layers[1]["magnitude_chance_o1"] == pytest.approx(0.7) and layers[1]["magnitude_chance_o2"] == pytest.approx(0.5)
    (up,) = p.modules
    assert up["module"] == "up" and up["expected_intersection_magnitude"] == pytest.approx(6.0)
    assert up["magnitude_chance_o1"] == pytest.approx(0.6) and up["magnitude_chance_o2"] == pytest.approx(0.5)
    assert p.magnitude_chance_o1 == pytest.approx(0.6)  # the global row pools too


def test_group_magnitude_chance_uses_the_groups_own_buckets():
    """Within one layer, two buckets: 8 weights in [1, 2), 8 in [1/4, 1/2). A picks 4 large (p_A = 1/2, 0);
    B picks 6 large and 2 small (p_B = 3/4, 1/4). E|A∩B| = 8 · 1/2 · 3/4 + 8 · 0 · 1/4 = 3: magnitude chance o1 =
    3/4, where the density chance is d_B = 1/2. Another layer with other magnitudes must not change this row."""
    l0, l1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    w0 = torch.cat([torch.full((8,), 1.0), torch.full((8,), 0.25)])
    a = Mask.from_bool({l0: _flags(16, range(0, 4)), l1: _flags(16, range(0, 16, 2))})
    b = Mask.from_bool({l0: _flags(16, [2, 3, 4, 5, 6, 7, 8, 9]), l1: _flags(16, range(0, 4))})
    p = overlap(a, b, base={l0: w0, l1: torch.full((16,), 0.25)})
    row = next(r for r in p.layers if r["layer"] == 0)
    assert row["chance_o1"] == pytest.approx(0.5)
    assert row["expected_intersection_magnitude"] == pytest.approx(3.0)
    assert row["magnitude_chance_o1"] == pytest.approx(0.75) and row["magnitude_chance_o2"] == pytest.approx(3 / 8)
    # layer 1, one bucket: the magnitude chance reduces to the density chance (E = 16 · 1/2 · 1/4 = 2)
    row1 = next(r for r in p.layers if r["layer"] == 1)
    assert row1["expected_intersection_magnitude"] == pytest.approx(2.0)
    assert row1["magnitude_chance_o1"] == pytest.approx(row1["chance_o1"]) == pytest.approx(0.25)


# -- the whole JSON result of a small case, every figure worked out by hand
T1, T0, T2 = "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"


def _golden_masks():
    meta = lambda tuned: {"kind": "changed", "atol": 1e-5, "dtype": "bf16", "base": {"source": "base-src"},  # noqa: E731
                          "tuned": {"source": tuned}}
    # tensors deliberately out of layer order: rows must still come out as layer 0, 1, then None
    a = Mask.from_bool({T1: _flags(4, [0, 1]), T0: _flags(4, [0, 2, 3]), T2: _flags(2, [0])}, meta("tuned-a"))
    b = Mask.from_bool({T1: _flags(4, [1, 2, 3]), T0: _flags(4, [0, 2]), T2: _flags(2, [0, 1])}, meta("tuned-b"))
    # two buckets per octave: [1, √2) holds 1.0 and 1.2, [√2, 2) holds 1.5, [√½, 1) holds 0.75, [2√2, 4) holds 3.0
    base = {T1: torch.tensor([1.0, 1.2, 1.5, 0.0]), T0: torch.tensor([1.0, 1.5, 1.5, 0.75]), T2: torch.tensor([3.0, -0.0])}
    return a, b, base


def _row(n, ca, cb, inter, mm):
    d_a, d_b = ca / n, cb / n
    exp = n * d_a * d_b
    return {"numel": n, "count_a": ca, "count_b": cb, "intersection": inter, "density_a": d_a, "density_b": d_b,
            "o1": inter / ca, "o2": inter / cb, "jaccard": inter / (ca + cb - inter), "chance_o1": d_b,
            "chance_o2": d_a, "chance_jaccard": exp / (ca + cb - exp), "expected_intersection_magnitude": mm,
            "magnitude_chance_o1": mm / ca, "magnitude_chance_o2": mm / cb, "magnitude_chance_jaccard": mm / (ca + cb - mm)}


def _approx_equal(got, want, path="$"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (path, list(got), list(want))
        for k in want:
            _approx_equal(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _approx_equal(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, (int, float)) and not isinstance(got, bool) and got == pytest.approx(want, rel=1e-12), (path, got, want)
    else:
        assert type(got) is type(want) and got == want, (path, got, want)


def test_overlap_json_of_a_hand_worked_case():
    import hashlib

    a, b, base = _golden_masks()
    r = overlap_many([a, b], ["A", "B"], base=base, bins_per_octave=2)
    # global: n 10, |A| 6, |B| 7, |A∩B| 4. Magnitude-matched, per bucket n·p_A·p_B = |A_b|·|B_b| / n_b:
    # [1,√2) 3·2/3 = 2, [√2,2) 1·2/3, [2√2,4) 1·1/1 = 1, zero and [√½,1) 0: E = 11/3
    layers = [{"layer": 0, "n_tensors": 1, **_row(4, 3, 2, 2, 1.5)},  # T0: 1·1/1 + 1·1/2 + 0
              {"layer": 1, "n_tensors": 1, **_row(4, 2, 3, 1, 1.0)},  # T1: 2·1/2 + 0 + 0
              {"layer": None, "n_tensors": 1, **_row(2, 1, 2, 1, 1.0)}]  # T2: 1·1/1 + 0
    modules = [{"module": m, **{k: v for k, v in row.items() if k != "layer"}}
               for m, row in zip(["q", "up", "lm_head"], layers)]
    r2 = 2 ** 0.5
    buckets = [
        {"bucket": "0", "abs_w_lo": 0.0, "abs_w_hi": 0.0, "numel": 2, "density_a": 0.0, "density_b": 1.0,
         "intersection": 0, "expected_intersection": 0.0},
        {"bucket": "[0.707, 1)", "abs_w_lo": 1 / r2, "abs_w_hi": 1.0, "numel": 1, "density_a": 1.0, "density_b": 0.0,
         "intersection": 0, "expected_intersection": 0.0},
        {"bucket": "[1, 1.41)", "abs_w_lo": 1.0, "abs_w_hi": r2, "numel": 3, "density_a": 1.0, "density_b": 2 / 3,
         "intersection": 2, "expected_intersection": 2.0},
        {"bucket": "[1.41, 2)", "abs_w_lo": r2, "abs_w_hi": 2.0, "numel": 3, "density_a": 1 / 3, "density_b": 2 / 3,
         "intersection": 1, "expected_intersection": 2 / 3},
        {"bucket": "[2.83, 4)", "abs_w_lo": 2 * r2, "abs_w_hi": 4.0, "numel": 1, "density_a": 1.0, "density_b": 1.0,
         "intersection": 1, "expected_intersection": 1.0},
    ]
    layout = "".join(f"{n}\tfloat32\t[{len(base[n])}]\n" for n in sorted(base))
    want = {
        "settings": {
            "masks": [{"label": "A", "kind": "changed", "atol": 1e-5, "dtype": "bf16", "density": 0.6,
                       "base": "base-src", "tuned": "tuned-a"},
                      {"label": "B", "kind": "changed", "atol": 1e-5, "dtype": "bf16", "density": 0.7,
                       "base": "base-src", "tuned": "tuned-b"}],
            "base": {"source": "base", "format": "memory", "n_tensors": 3, "numel": 10, "nbytes": 40,
                     "dtypes": {"float32": 3}, "layout_sha256": hashlib.sha256(layout.encode()).hexdigest(),
                     "content_hash": None},
            "buckets": "log2 of |w| in the base (float32), 2 per octave; zeros and non-finite values in their own buckets",
            "bins_per_octave": 2,
            "group_magnitude_chance": "bucket probabilities estimated within each layer / module group",
        },
        "masks": [{"label": "A", "density": 0.6}, {"label": "B", "density": 0.7}],
        "pairs": [{"a": "A", "b": "B", **_row(10, 6, 7, 4, 11 / 3), "layers": layers, "modules": modules,
                   "buckets": buckets}],
        "matrix": {"rows_are": "A", "cols_are": "B", "o1": [[1.0, 4 / 6], [4 / 7, 1.0]],
                   "chance_o1": [[1.0, 0.7], [0.6, 1.0]], "magnitude_chance_o1": [[1.0, 11 / 18], [11 / 21, 1.0]]},
        "warnings": [],
    }
    _approx_equal(r.to_json(), want)
    _approx_equal(overlap(a, b, base=base, bins_per_octave=2, labels=("A", "B")).to_json(), want["pairs"][0])

    # without a base: no magnitude figures, no buckets, no base in the settings
    drop = ("expected_intersection_magnitude", "magnitude_chance_o1", "magnitude_chance_o2", "magnitude_chance_jaccard")
    strip = lambda row: {k: v for k, v in row.items() if k not in drop}  # noqa: E731
    plain = overlap_many([a, b], ["A", "B"])
    want_plain = {
        "settings": {**want["settings"], "base": None, "buckets": None, "bins_per_octave": None},
        "masks": want["masks"],
        "pairs": [{"a": "A", "b": "B", **strip(_row(10, 6, 7, 4, 1.0)), "layers": [strip(x) for x in layers],
                   "modules": [strip(x) for x in modules]}],
        "matrix": {**want["matrix"], "magnitude_chance_o1": None},
        "warnings": [],
    }
    _approx_equal(plain.to_json(), want_plain)
    assert plain.pairs[0].buckets is None and plain.pair("A", "B") is plain.pairs[0]
    with pytest.raises(KeyError, match=r"\('B', 'A'\)"):
        plain.pair("B", "A")
    with pytest.raises(AttributeError, match="no_such_figure"):
        plain.pairs[0].no_such_figure


def test_one_bucket_per_octave_is_named_in_the_settings_and_splits_at_powers_of_two():
    a, b, base = _golden_masks()
    r = overlap_many([a, b], ["A", "B"], base=base)
    assert r.settings["buckets"] == ("log2 of |w| in the base (float32), 1 per octave (= one bf16 exponent, one bf16 "
                                     "ULP, per bucket); zeros and non-finite values in their own buckets")
    # 1.0, 1.2 and 1.5 now share [1, 2): that bucket has n 6, A 4, B 4 (E = 16/6); [2, 4) 1·1/1; [0.5, 1) 1·0/1
    assert r.pairs[0].expected_intersection_magnitude == pytest.approx(16 / 6 + 1)
    assert [row["bucket"] for row in r.pairs[0].buckets] == ["0", "[0.5, 1)", "[1, 2)", "[2, 4)"]


def test_three_masks_count_every_pair_on_the_pattern_path():
    """With 3 masks each block is counted once by membership pattern; pair (1, 2) must equal its own overlap."""
    g = torch.Generator().manual_seed(4)
    like = {"w": (30, 20), "v": (13,)}
    masks = [random_mask(like, density=d, seed=s) for d, s in ((0.3, 1), (0.2, 2), (0.5, 3))]
    base = {"w": torch.randn(30, 20, generator=g) * 4, "v": torch.randn(13, generator=g)}
    many = overlap_many(masks, ["0", "1", "2"], base=base)
    for p in many.pairs:
        i, j = int(p.a), int(p.b)
        two = overlap(masks[i], masks[j], base=base)
        assert p.figures == two.figures and p.buckets == two.buckets and p.layers == two.layers, (i, j)


def test_the_base_is_counted_the_same_in_any_number_of_blocks(monkeypatch):
    import importlib

    overlap_mod = importlib.import_module("rlsubnet.masks.overlap")  # the package exports the function overlap

    g = torch.Generator().manual_seed(6)
    like = {"w": (17, 9), "v": (5,)}
    masks = [random_mask(like, density=d, seed=s) for d, s in ((0.3, 1), (0.4, 2))]
    base = {"w": torch.randn(17, 9, generator=g), "v": torch.randn(5, generator=g)}
    whole = overlap(masks[0], masks[1], base=base).to_json()
    many = [random_mask(like, density=0.3, seed=s) for s in range(9)]  # the per-mask counting path too
    whole_many = overlap_many(many, base=base).to_json()
    monkeypatch.setattr(overlap_mod, "BUCKET_BLOCK_NUMEL", 16)  # 153 entries: 10 blocks
    assert overlap(masks[0], masks[1], base=base).to_json() == whole
    assert overlap_many(many, base=base).to_json() == whole_many


def test_bucket_edges_and_special_buckets():
    from rlsubnet.masks.overlap import _sub_thresholds, n_buckets

    assert bucket_bounds(0, 1) == (0.0, 0.0, "0")
    assert bucket_bounds(1, 1) == (None, None, "nan/inf")
    assert bucket_bounds(2, 1) == (0.0, 2.0 ** -126, "subnormal")
    assert n_buckets(1) == 257 and n_buckets(3) == 3 + 3 * 254
    # non-finite values get their bucket even when no zero or subnormal is in the same block
    assert bucket_index(torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])).tolist() == [129, 1, 1, 1]
    # a mantissa exactly at a sub-octave boundary belongs to the upper bucket: |w| >= 2^(j/k) starts bucket j
    thr = int(_sub_thresholds(2)[0])
    at, below = 1 + thr / 2**23, 1 + (thr - 1) / 2**23
    assert below < 2**0.5 <= at
    hi, lo = bucket_index(torch.tensor([at, below]), 2).tolist()
    assert hi == lo + 1


def test_usage_errors_labels_and_warnings_name_what_is_wrong():
    from rlsubnet.masks.overlap import pair_figures

    a = Mask.from_bool({"w": _flags(8, [1, 2])}, {"atol": 1e-5, "dtype": "bf16"})
    b = Mask.from_bool({"w": _flags(8, [2, 3])}, {"atol": 1e-5, "dtype": "fp32"})
    with pytest.raises(UsageError, match="^overlap needs at least two masks$"):
        overlap_many([a])
    with pytest.raises(UsageError, match="^one label per mask$"):
        overlap_many([a, b], ["x"])
    with pytest.raises(UsageError, match="^bins_per_octave must be at least 1, got 0$"):
        overlap_many([a, b], bins_per_octave=0)
    with pytest.raises(MaskMismatchError, match="^x vs y: cannot compare masks over different tensors"):
        overlap_many([a, Mask.from_bool({"v": _flags(8, [1])})], ["x", "y"])
    a.meta["path"] = "first.safetensors"
    r = overlap_many([a, b])
    assert r.labels == ["first.safetensors", "mask1"]
    assert r.warnings == ["masks were built with different dtype: first.safetensors='bf16', mask1='fp32'"]
    assert overlap_many([a, a]).warnings == []
    # a comparison over no entries at all: densities are 0, ratios undefined
    f = pair_figures(0, 0, 0, 0)
    assert (f["density_a"], f["density_b"], f["o1"], f["jaccard"]) == (0.0, 0.0, None, None)


def test_empty_masks_have_no_diagonal_entries():
    a = Mask.from_bool({"w": _flags(8, [])})
    b = Mask.from_bool({"w": _flags(8, [1])})
    r = overlap_many([a, b], base={"w": torch.ones(8)})
    assert r.matrix_o1[0][0] is None and r.matrix_o1[1][1] == 1.0
    assert r.matrix_chance_o1[0][0] is None and r.matrix_chance_o1[1][1] == 1.0
    assert r.matrix_magnitude_chance_o1[0][0] is None and r.matrix_magnitude_chance_o1[1][1] == 1.0


def test_a_pickle_base_needs_allow_pickle(tmp_path):
    from rlsubnet.errors import CheckpointError

    a = Mask.from_bool({"w": _flags(8, [1, 2])})
    b = Mask.from_bool({"w": _flags(8, [2, 3])})
    torch.save({"w": torch.ones(8)}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        overlap(a, b, base=tmp_path / "base.pt")
    p = overlap(a, b, base=tmp_path / "base.pt", allow_pickle=True)
    assert p.expected_intersection_magnitude == pytest.approx(2 * 2 / 8)
    # a base that is not the masks' own is named as given (a state dict is "base")
    with pytest.raises(MaskMismatchError, match="^base does not match the masks"):
        overlap(a, b, base={"v": torch.ones(8)})


def test_warnings_about_the_base_name_the_masks_and_sources(tmp_path):
    from rlsubnet.checkpoint import save_state_dict
    from rlsubnet.checkpoint.hashing import HASH_SCHEME, hash_state_dict

    base = {"w": torch.ones(8), "v": torch.zeros(3)}
    save_state_dict(base, tmp_path / "base")
    a = Mask.from_bool({"w": _flags(8, [1, 2]), "v": _flags(3, [0])})
    b = Mask.from_bool({"w": _flags(8, [2, 3]), "v": _flags(3, [])})
    a.meta["path"] = "a.safetensors"
    ident = overlap(a, b, base=tmp_path / "base").to_json()  # no recorded identity: nothing to compare
    assert overlap_many([a, b], base=tmp_path / "base").warnings == []
    own = overlap_many([a, b], base=tmp_path / "base").settings["base"]
    assert own["content_hash"] is None and ident["buckets"]
    # a recorded base with the same layout and content: silent; another layout or content: named
    same = {"source": "orig", "layout_sha256": own["layout_sha256"], "content_hash": hash_state_dict(base).digest,
            "content_hash_scheme": HASH_SCHEME, "content_scope": "all tensors"}
    a.meta["base"] = dict(same)
    r = overlap_many([a, b], base=tmp_path / "base")
    assert r.warnings == [] and r.settings["base"]["content_hash"] == same["content_hash"]
    a.meta["base"] = dict(same, layout_sha256="0" * 64, content_hash="1" * 32)
    r = overlap_many([a, b], base=tmp_path / "base")
    src = str(tmp_path / "base")
    assert r.warnings == [
        f"--base {src} has a different layout (names, dtypes, shapes) from the base 'orig' recorded in mask a.safetensors",
        f"--base {src} holds different weights from the base 'orig' recorded in mask a.safetensors (content hashes differ)",
    ]
    b.meta["base"] = dict(same, layout_sha256="0" * 64, content_hash="1" * 32)  # no path: named by its kind
    assert overlap_many([a, b], base=tmp_path / "base").warnings[2:] == [
        f"--base {src} has a different layout (names, dtypes, shapes) from the base 'orig' recorded in mask changed",
        f"--base {src} holds different weights from the base 'orig' recorded in mask changed (content hashes differ)",
    ]
    # the base file is closed again afterwards (the checkpoint was opened here, so it is closed here)
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in fds if f.startswith(src)]


def test_a_base_of_another_layout_is_named_with_every_difference():
    a = Mask.from_bool({"w": _flags(8, [1]), "v": _flags(4, [0])})
    with pytest.raises(MaskMismatchError, match=r"^base does not match the masks \(1 mask tensors missing from the base: "
                       r"v; 1 with different shapes: w \[2, 4\] vs \[8\]\)$"):
        overlap(a, a, base={"w": torch.zeros(2, 4)})


def test_a_pair_result_survives_copy_and_pickle():
    import copy
    import pickle

    a, b, base = _golden_masks()
    p = overlap(a, b, base=base)
    for clone in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert clone.to_json() == p.to_json() and clone.o1 == p.o1


def test_group_magnitude_chance_against_an_independent_computation():
    """Random masks over tensors of several layers and module kinds, weights over several binades (zeros and
    subnormals included). Each layer and module row's magnitude-matched expectation is recomputed here from
    scratch: buckets from math.frexp of each |w|, probabilities estimated within the group only."""
    from collections import defaultdict

    g = torch.Generator().manual_seed(12)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    base, ta, tb = {}, {}, {}
    for k, name in enumerate(names):
        w = torch.randn(60, generator=g) * 4.0 ** (k - 2)
        w[:3] = torch.tensor([0.0, -0.0, 1e-40])
        base[name] = w
        # the masks prefer large weights, more so in some tensors than others: p depends on group and bucket
        p = torch.sigmoid(w.abs().log2() - k)
        ta[name] = torch.rand(60, generator=g) < p
        tb[name] = torch.rand(60, generator=g) < p.sqrt()
    a, b = Mask.from_bool(ta), Mask.from_bool(tb)
    r = overlap(a, b, base=base)

    def bucket(x: float) -> object:
        x = abs(x)
        if x == 0:
            return "zero"
        if x < 2.0**-126:
            return "subnormal"
        return math.frexp(x)[1]  # one bucket per binade

    def expected(members):
        n, ca, cb = defaultdict(int), defaultdict(int), defaultdict(int)
        for name in members:
            for x, fa, fb in zip(base[name].tolist(), ta[name].tolist(), tb[name].tolist()):
                k = bucket(x)
                n[k] += 1
                ca[k] += fa
                cb[k] += fb
        return sum(ca[k] * cb[k] / n[k] for k in n), sum(ca.values()), sum(cb.values())

    groups = {"layer": {0: names[:2], 1: names[2:4], None: names[4:]},
              "module": {"q": [names[0], names[2]], "up": [names[1], names[3]], "lm_head": [names[4]]}}
    for key, rows in (("layer", r.layers), ("module", r.modules)):
        assert sorted(map(str, (row[key] for row in rows))) == sorted(map(str, groups[key]))
        for row in rows:
            mm, ca, cb = expected(groups[key][row[key]])
            assert row["expected_intersection_magnitude"] == pytest.approx(mm, rel=1e-12), (key, row[key])
            assert row["magnitude_chance_o1"] == pytest.approx(mm / ca, rel=1e-12), (key, row[key])
            assert row["magnitude_chance_o2"] == pytest.approx(mm / cb, rel=1e-12), (key, row[key])
    mm, ca, cb = expected(names)
    assert r.expected_intersection_magnitude == pytest.approx(mm, rel=1e-12)
    # and the groups do differ from the pooled estimate, so pooling by mistake would show
    assert any(abs(row["magnitude_chance_o1"] - mm / ca) > 0.01 for row in r.layers)


def test_an_empty_tensor_between_others_leaves_the_rest_counted():
    """A tensor with no entries (a zero-size dimension) is skipped in the base's stream, not the end of it."""
    a = Mask.from_bool({"w": _flags(4, [0, 1]), "e": torch.zeros(0, 3, dtype=torch.bool), "z": _flags(4, [0, 1])})
    b = Mask.from_bool({"w": _flags(4, [1, 2]), "e": torch.zeros(0, 3, dtype=torch.bool), "z": _flags(4, [0, 1])})
    base = {"w": torch.ones(4), "e": torch.zeros(0, 3), "z": torch.full((4,), 4.0)}
    p = overlap(a, b, base=base)
    # one bucket per tensor: w: 2·2/4 = 1, z: 2·2/4 = 1
    assert p.expected_intersection_magnitude == pytest.approx(2.0)
    assert [(row["bucket"], row["numel"]) for row in p.buckets] == [("[1, 2)", 4), ("[4, 8)", 4)]


def test_option_ranges_and_masks_over_nothing_are_refused():
    a = Mask.from_bool({"w": _flags(8, [1, 2])})
    with pytest.raises(UsageError, match="^bins_per_octave must be at most 128, got 129$"):
        overlap_many([a, a], bins_per_octave=129)
    empty = Mask.from_bool({"e": torch.zeros(0, 2, dtype=torch.bool)})
    with pytest.raises(UsageError, match=r"^x, y: the masks cover no parameters \(1 tensors, all empty\): nothing to "
                       r"overlap$"):
        overlap_many([empty, empty], ["x", "y"])


def test_the_base_is_read_offline_and_quietly_unless_asked(monkeypatch):
    """No download and no progress bar by default; each only when asked for."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw["local_files_only"])
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    a = Mask.from_bool({"w": _flags(8, [1, 2])})
    from rlsubnet.errors import CheckpointError

    for kw in ({}, {"allow_download": True}):
        with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
            overlap(a, a, base="nobody/no-such-model", **kw)
    assert calls == [True, False]
    import importlib

    overlap_mod = importlib.import_module("rlsubnet.masks.overlap")
    bars = []

    class Recording(overlap_mod.BlockStream):
        def __init__(self, *args, progress=None, **kw):
            bars.append(progress)
            super().__init__(*args, progress=progress, **kw)

    monkeypatch.setattr(overlap_mod, "BlockStream", Recording)
    overlap(a, a, base={"w": torch.ones(8)})
    overlap(a, a, base={"w": torch.ones(8)}, progress=True)
    assert bars == [None, "base"]


def test_bucket_sums_refuse_missing_counts_and_an_empty_sum_in_words():
    """The guards behind the chance figures: counts of a tensor the base stream never filled in, or a sum over no
    tensors, stop with a message saying which (never a sum that silently leaves a tensor out)."""
    import numpy as np

    from rlsubnet.masks.overlap import _summed

    assert _summed([np.array([1, 2]), np.array([3, 4])]).tolist() == [4, 6]
    with pytest.raises(ValueError, match="^bucket counts are missing: the base was not streamed$"):
        _summed([np.array([1, 2]), None])
    with pytest.raises(ValueError, match="^no tensors to sum bucket counts over$"):
        _summed([])
