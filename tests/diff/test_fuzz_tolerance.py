"""Property-based tests of the tolerance test: every implementation of "changed" against the paper's definition,

    changed = ~torch.isclose(tuned.to(cmp) - base.to(cmp), 0, rtol=0, atol=atol)

computed directly, over arbitrary bit patterns of bf16 / fp16 / fp32 (NaN payloads, ±0, ±Inf, subnormals) and any
float atol (−0.0 included: it is 0). Implementations: DeltaAccumulator (compare), threshold_bits, ChangedTest,
changed_masks and the mask builder's packing. An atol that is NaN, infinite or negative must be refused with a
UsageError everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlsubnet
from fuzzing import examples
from rlsubnet.diff.changed import ChangedTest, changed_mask, changed_masks, comparison_dtype, threshold_bits
from rlsubnet.diff.stats import tensor_stats
from rlsubnet.errors import UsageError
from rlsubnet.masks.build import build_mask, pack_changed

FLOATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_OF = {2: torch.int16, 4: torch.int32}
WIDTH = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


def from_bits(words: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Raw unsigned bit patterns viewed as ``dtype``."""
    width = WIDTH[dtype]
    signed = [w - (1 << width) if w >= 1 << (width - 1) else w for w in words]
    return torch.tensor(signed, dtype=INT_OF[width // 8]).view(dtype)


def _tie_points(dtype: torch.dtype, k: int) -> list[float]:
    """Tolerances at and one double-ULP either side of the midpoint between two neighbouring values of ``dtype``:
    where rounding atol to ``dtype`` (ties to even, and the double -> float -> bfloat16 double rounding) decides."""
    lo, hi = (float(x) for x in from_bits([k, k + 1], dtype))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [lo if math.isfinite(lo) else 0.0]
    mid = (lo + hi) / 2
    return [lo, hi, mid, math.nextafter(mid, math.inf), math.nextafter(mid, -math.inf)]


SPECIAL_ATOLS = [0.0, 1e-5, 1e-8, 5e-324, 2.0 ** -149, 2.0 ** -133, 2.0 ** -24, 9.2e-41, 6e-8, 1.0, 65504.0,
                 65520.0, 3.3895313892515355e38, 3.4028234663852886e38, 1e38, 1e39, 1.7e308]


@st.composite
def atols(draw) -> float:
    """Any finite non-negative float, weighted towards the values where the tolerance test can go wrong."""
    kind = draw(st.integers(0, 3))
    if kind == 0:  # any: subnormals of float64, 1e308, ...
        atol = draw(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False))
    elif kind == 1:
        atol = draw(st.sampled_from(SPECIAL_ATOLS))
    else:  # next to a rounding tie of bf16 / fp16 (kind 2) or fp32 (kind 3)
        dtype = draw(st.sampled_from(list(FLOATS.values()))) if kind == 2 else torch.float32
        k = draw(st.integers(0, 0x7F7E if WIDTH[dtype] == 16 else 0x7F7FFFFE))
        points = _tie_points(dtype, k)
        atol = points[draw(st.integers(0, len(points) - 1))]
    # −0.0 is 0 wherever a tolerance is read: drawn as often as +0.0
    return -0.0 if atol == 0 and draw(st.booleans()) else atol


SPECIAL_BITS = {
    16: [0x0000, 0x8000, 0x0001, 0x8001, 0x7F80, 0xFF80, 0x7C00, 0xFC00, 0x7FC0, 0x7E00, 0xFFFF, 0x7F7F, 0x7BFF,
         0x3F80, 0x3C00, 0x0080, 0x0400, 0x377F, 0x3780],
    32: [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
         0xFFFFFFFF, 0x7F7FFFFF, 0x3F800000, 0x00800000, 0x3727C5AC, 0x3727C5AD],
}


def _words(raw: bytes, width: int) -> list[int]:
    return np.frombuffer(raw, dtype=np.uint16 if width == 16 else np.uint32).tolist()


@st.composite
def bit_pair(draw, n_max: int = 24):
    """(base, tuned) tensors of any two of bf16 / fp16 / fp32, each entry an arbitrary bit pattern, a special
    one (±0, ±Inf, NaN payloads, extremes), or the other side's a few ULPs or a sign away. Drawn as a few byte
    strings rather than element by element: generation stays cheap, and shrinking still works byte-wise."""
    bd = draw(st.sampled_from(list(FLOATS.values())))
    td = draw(st.sampled_from(list(FLOATS.values())))
    n = draw(st.integers(1, n_max))
    bw, tw = WIDTH[bd], WIDTH[td]
    base = _words(draw(st.binary(min_size=n * bw // 8, max_size=n * bw // 8)), bw)
    tuned = _words(draw(st.binary(min_size=n * tw // 8, max_size=n * tw // 8)), tw)
    # one byte per entry: which kind of pair it is (the low bits pick the special value or the ULP offset)
    kinds = draw(st.binary(min_size=n, max_size=n))
    specials_b, specials_t = SPECIAL_BITS[bw], SPECIAL_BITS[tw]
    for i, k in enumerate(kinds):
        if k < 48:  # special base value, tuned any
            base[i] = specials_b[k % len(specials_b)]
        elif k < 96:  # special tuned value
            tuned[i] = specials_t[k % len(specials_t)]
        elif k < 112:  # both special
            base[i], tuned[i] = specials_b[k % len(specials_b)], specials_t[(k // 3) % len(specials_t)]
        elif bw == tw and k < 176:  # a few ULPs apart (wrapping through the sign and into NaN/Inf)
            tuned[i] = (base[i] + (k % 7) - 3) % (1 << tw)
        elif bw == tw and k < 208:
            tuned[i] = base[i]
        elif bw == tw and k < 224:
            tuned[i] = base[i] ^ (1 << (tw - 1))  # the same magnitude, the other sign
    return from_bits(base, bd), from_bits(tuned, td)


def paper_changed(base: torch.Tensor, tuned: torch.Tensor, atol: float, cmp: torch.dtype) -> torch.Tensor:
    delta = tuned.to(cmp) - base.to(cmp)
    return ~torch.isclose(delta, torch.zeros_like(delta), rtol=0, atol=atol)


MODES = ["bf16", "fp32", "native"]


def _refused_or_counted(base, tuned, atol, mode):
    """The comparison dtype, and whether rlsubnet may refuse this atol there: only when it lies beyond the
    largest finite value of that dtype (torch would round the tolerance to infinity)."""
    cmp = comparison_dtype(mode, base.dtype, tuned.dtype)
    return cmp, atol > torch.finfo(cmp).max


@examples(300)
@given(pair=bit_pair(), atol=atols(), mode=st.sampled_from(MODES))
def test_engine_counts_equal_the_paper_definition(pair, atol, mode):
    base, tuned = pair
    cmp, may_refuse = _refused_or_counted(base, tuned, atol, mode)
    try:
        s = tensor_stats("w", base, tuned, atols=(0.0, atol), mode=mode)
    except UsageError:
        assert may_refuse, f"atol {atol!r} refused in {cmp}"
        return
    delta = tuned.to(cmp) - base.to(cmp)
    expected = [int(paper_changed(base, tuned, a, cmp).sum()) for a in s.atols]
    assert list(s.changed) == expected
    # changes hidden by the largest atol: Δ ≠ 0 (NaN included) but within it
    nonzero = int(((delta != 0) | torch.isnan(delta)).sum())
    assert s.hidden == nonzero - expected[s.atols.index(max(s.atols))]
    finite = torch.isfinite(delta)
    want = {"base_nan": int(torch.isnan(base.to(cmp)).sum()), "base_inf": int(torch.isinf(base.to(cmp)).sum()),
            "tuned_nan": int(torch.isnan(tuned.to(cmp)).sum()), "tuned_inf": int(torch.isinf(tuned.to(cmp)).sum()),
            "delta_nonfinite": int((~finite).sum())}
    assert s.nonfinite == {k: v for k, v in want.items() if v}
    assert s.max_abs_delta == (float(delta[finite].abs().max().float()) if finite.any() else 0.0)
    # the norms, over the finite Δ (float64 reference): fp32 sums of squares lose ~1e-6 relative, and the square
    # of an entry below ~1e-19 underflows fp32 (at most 24 entries: under 1e-18 of norm lost that way)
    d64, b64 = delta[finite].double(), base.to(cmp)[finite].double()
    close = lambda x, y: x == pytest.approx(y, rel=1e-5, abs=1e-18)  # noqa: E731
    assert close(s.delta_norm, float(d64.square().sum().sqrt()))
    assert close(s.base_norm, float(b64.square().sum().sqrt()))
    if finite.any():
        assert close(s.mean_abs_delta, float(d64.abs().mean()))
    else:
        assert s.mean_abs_delta is None


@examples(300)
@given(pair=bit_pair(), atol=atols(), mode=st.sampled_from(MODES))
def test_every_changed_test_agrees_entry_by_entry(pair, atol, mode):
    base, tuned = pair
    cmp, may_refuse = _refused_or_counted(base, tuned, atol, mode)
    try:
        thr = threshold_bits(atol, cmp)
    except UsageError:
        assert may_refuse
        for call in (lambda: changed_masks(base, tuned, [atol], mode),
                     lambda: changed_mask(base, tuned, atol, mode)):
            with pytest.raises(UsageError):
                call()
        return
    expected = paper_changed(base, tuned, atol, cmp)
    # threshold_bits itself: |Δ| <= atol  <=>  sign-cleared bits <= thr (NaN patterns sort above every threshold)
    delta = tuned.to(cmp) - base.to(cmp)
    width = WIDTH[cmp]
    bits = delta.view(INT_OF[width // 8]).to(torch.int64) & ((1 << (width - 1)) - 1)
    assert torch.equal(bits > thr, expected)
    assert torch.equal(changed_masks(base, tuned, [atol], mode)[0], expected)
    assert torch.equal(changed_mask(base, tuned, atol, mode), expected)
    test = ChangedTest(base.dtype, tuned.dtype, (atol, 0.0), mode)
    assert test.thresholds[0] == thr
    got, at_zero = test.changed(base, tuned)
    assert np.array_equal(got, expected.numpy())
    assert np.array_equal(at_zero, paper_changed(base, tuned, 0.0, cmp).numpy())
    packed = np.zeros((base.numel() + 7) // 8, dtype=np.uint8)
    pack_changed(test, base, tuned, packed)
    assert packed.tobytes() == np.packbits(expected.numpy(), bitorder="big").tobytes()


@examples(40)
@given(pair=bit_pair(n_max=12), atol=atols(), mode=st.sampled_from(MODES))
def test_compare_and_build_mask_agree_with_the_definition(pair, atol, mode):
    """The public entry points (state dicts in memory): compare's count and the mask's bits."""
    base, tuned = pair
    cmp, may_refuse = _refused_or_counted(base, tuned, atol, mode)
    try:
        r = rlsubnet.compare({"w": base}, {"w": tuned}, atol=atol, mode=mode)
        m = build_mask({"w": base}, {"w": tuned}, atol=atol, mode=mode, hash_content=False)
    except UsageError:
        assert may_refuse
        return
    expected = paper_changed(base, tuned, atol, cmp)
    assert r.changed(atol) == int(expected.sum())
    assert torch.equal(m.tensor("w"), expected)


BAD_ATOLS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1e-5, -5e-324, -1e308]),
    st.floats(max_value=-5e-324, allow_nan=False),  # every negative (not -0.0)
    st.floats(allow_nan=True).filter(math.isnan),  # NaN, any payload Hypothesis builds
)


@examples(60)
@given(atol=BAD_ATOLS)
def test_nan_infinite_and_negative_atols_are_refused_everywhere(atol):
    b, t = torch.zeros(3), torch.tensor([0.0, 1e-6, float("inf")])
    calls = [
        lambda: tensor_stats("w", b, t, atols=(atol,)),
        lambda: threshold_bits(atol, torch.bfloat16),
        lambda: threshold_bits(atol, torch.float32),
        lambda: changed_masks(b, t, [atol]),
        lambda: changed_mask(b, t, atol),
        lambda: ChangedTest(torch.float32, torch.float32, (0.0, atol)),
        lambda: rlsubnet.compare({"w": b}, {"w": t}, atol=atol),
        lambda: build_mask({"w": b}, {"w": t}, atol=atol, hash_content=False),
    ]
    for call in calls:
        with pytest.raises(UsageError, match="atol"):
            call()


def test_a_lone_positive_infinite_delta_is_a_non_finite_entry():
    """The boundary of the non-finite test: Δ = +Inf exactly (the smallest non-finite bit pattern, the NaN floor)
    must go to the non-finite path, alone in its block, in every comparison dtype."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = torch.zeros(1, dtype=dtype)
        tuned = torch.full((1,), math.inf, dtype=dtype)
        s = tensor_stats("w", base, tuned, atols=(0.0, 1e-5), mode="native")
        assert s.nonfinite == {"tuned_inf": 1, "delta_nonfinite": 1}, dtype
        assert s.max_abs_delta == 0.0 and s.mean_abs_delta is None and s.changed == (1, 1)
        # a finite pair whose difference overflows to +Inf (max - (-max)): non-finite Δ, no non-finite input
        big = torch.finfo(dtype).max
        s = tensor_stats("w", torch.tensor([-big, 1.0], dtype=dtype), torch.tensor([big, 1.5], dtype=dtype),
                         atols=(0.0,), mode="native")
        assert s.nonfinite == {"delta_nonfinite": 1}, dtype
        assert s.max_abs_delta == 0.5 and s.mean_abs_delta == 0.5 and s.changed == (2,)
    # and -Inf alone, the same bits with the sign set
    s = tensor_stats("w", torch.zeros(1), torch.full((1,), -math.inf), atols=(0.0,), mode="fp32")
    assert s.nonfinite == {"tuned_inf": 1, "delta_nonfinite": 1} and s.max_abs_delta == 0.0
