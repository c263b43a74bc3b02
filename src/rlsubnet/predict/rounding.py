"""How far an fp32 master weight must move before its stored value counts as changed.

A stored weight w0 sits exactly on the storage dtype's grid, and training starts its fp32 master at w0. The
stored value of a master m is m rounded to nearest on that grid, and it counts as changed when the changed-test
(:class:`rlsubnet.diff.changed.ChangedTest`, the one every measurement uses: |Δ| > atol in the comparison mode)
says so against w0. Upward, the first grid point g above w0 that the test calls changed is found by a search on
the grid (one step for most entries; more where atol spans several ulps, as for tiny weights); the master must
cross the rounding boundary below g, the midpoint between g and the grid point before it. So the distance up
is half an ulp for a typical entry, and a quarter of the upper ulp just above a power of two going down. When the
storage dtype is the master's own (fp32), there is no rounding: the master must reach g itself.

Non-finite stored values get distance 0 both ways: their Δ is NaN, which the changed-test always calls changed.
"""

from __future__ import annotations

import torch

from rlsubnet.diff.changed import ChangedTest

_WIDTH_BITS = {2: 16, 4: 32}


def _ordinal(x: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the values (±0 both 0): a sign-magnitude pattern b maps to b when b ≥ 0 and
    to −2^(w−1) − b when negative (the map is its own inverse)."""
    width = x.element_size()
    bits = x.view(torch.int16 if width == 2 else torch.int32).to(torch.int32 if width == 2 else torch.int64)
    return torch.where(bits < 0, -(1 << (_WIDTH_BITS[width] - 1)) - bits, bits)


def _from_ordinal(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.empty((), dtype=dtype).element_size()
    bits = torch.where(o < 0, -(1 << (_WIDTH_BITS[width] - 1)) - o, o)
    return bits.to(torch.int16 if width == 2 else torch.int32).view(dtype)


def _max_ordinal(dtype: torch.dtype) -> int:
    """Ordinal of +inf: the search never goes past it (beyond lie NaN patterns)."""
    return int(_ordinal(torch.tensor([float("inf")], dtype=dtype))[0])


def change_distances(
    w0: torch.Tensor, storage: torch.dtype, atol: float, mode: str, master: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down): float64 tensors in ``w0``'s shape, the smallest displacement of the master upward and downward
    that makes the stored value count as changed against ``w0`` (``w0`` is cast to ``storage`` first)."""
    shape = w0.shape
    w = w0.detach().reshape(-1).to(storage)
    test = ChangedTest(storage, storage, atol, mode)
    rounds = storage != master
    o0 = _ordinal(w)
    top = _max_ordinal(storage)
    w64 = w.to(torch.float64)
    out = []
    for sign in (1, -1):
        k = _first_changed(test, w, o0, sign, top)
        g_ord = o0 + sign * k
        g = _from_ordinal(g_ord, storage).to(torch.float64)
        if rounds:
            before = _from_ordinal(g_ord - sign, storage).to(torch.float64)
            target = torch.where(torch.isinf(g), g, (g + before) / 2)
        else:
            target = g
        dist = (target - w64) * sign
        dist = torch.where(torch.isfinite(w64), dist, torch.zeros_like(dist))
        out.append(dist.clamp_min(0.0).reshape(shape))
    return out[0], out[1]


def _first_changed(test: ChangedTest, w: torch.Tensor, o0: torch.Tensor, sign: int, top: int) -> torch.Tensor:
    """Smallest k ≥ 1 with changed(w, grid point k steps away in direction ``sign``), capped at ±inf."""
    limit = ((top - o0) if sign > 0 else (o0 + top)).clamp_min(1)  # steps to ±inf
    dtype = w.dtype

    def changed(idx: torch.Tensor | None, steps: torch.Tensor) -> torch.Tensor:
        base, start = (w, o0) if idx is None else (w[idx], o0[idx])
        return torch.from_numpy(test.changed(base, _from_ordinal(start + sign * steps, dtype))[0].copy())

    # One grid step is enough for most entries. For the rest the answer sits next to the grid point nearest
    # w ± atol (the tolerance as the test applies it): start there and confirm it (changed there, not one
    # step before); only what fails that goes through the search.
    k = torch.ones_like(o0)
    rest = torch.nonzero(~changed(None, k)).reshape(-1)
    if rest.numel() == 0:
        return k
    w64 = w[rest].to(torch.float64)
    guess = (w64 + sign * test_tolerance(test)).to(dtype)
    lim = limit[rest]
    kr = ((_ordinal(guess) - o0[rest]) * sign).clamp(1).minimum(lim)
    kr = torch.where(torch.isfinite(w64), kr, torch.ones_like(kr))
    for _ in range(2):  # the rounding of the guess and of Δ moves it by a step or two
        ok = changed(rest, kr)
        kr = torch.where(ok, kr, (kr + 1).minimum(lim))
        kr = torch.where(ok & (kr > 1) & changed(rest, (kr - 1).clamp_min(1)), kr - 1, kr)
    bad = ~changed(rest, kr) | ((kr > 1) & changed(rest, (kr - 1).clamp_min(1)))
    todo = torch.nonzero(bad).reshape(-1)
    if todo.numel():
        kr[todo] = _search(changed, rest[todo], lim[todo])
    k[rest] = kr
    return k


def test_tolerance(test: ChangedTest) -> float:
    from rlsubnet.diff.changed import atol_threshold

    return atol_threshold(test.atols[0], test.cmp_dtype) if test.is_float else test.atols[0]


def _search(changed, todo: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Doubling, then bisection between the last step that did not change and the first that did."""
    lo = torch.zeros_like(limit)
    hi = torch.ones_like(limit)
    while True:
        grow = ~changed(todo, hi) & (hi < limit)
        if not bool(grow.any()):
            break
        lo = torch.where(grow, hi, lo)
        hi = torch.where(grow, torch.minimum(hi * 2, limit), hi)
    while True:
        open_ = hi - lo > 1
        if not bool(open_.any()):
            return hi
        mid = (lo + hi) // 2
        ok = changed(todo, mid)
        hi = torch.where(open_ & ok, mid, hi)
        lo = torch.where(open_ & ~ok, mid, lo)
