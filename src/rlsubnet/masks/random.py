"""Random masks of matched density: the baseline every subnetwork claim must beat.

Two scopes (recorded in the mask's ``extra.random.scope``):

- ``per_tensor``: every tensor gets exactly as many entries as the reference mask has in that tensor, placed
  uniformly at random inside the tensor. Per-tensor and per-module densities match the reference exactly
  (norms the reference never touches stay untouched).
- ``global``: the mask gets exactly the reference's total count, placed uniformly at random over all parameters;
  per-tensor counts then vary (multivariate hypergeometric), norms included.

Sampling is exact (a uniformly random k-subset), streamed in chunks so memory stays bounded by one chunk plus
the packed masks, whatever the model size: each chunk's count is drawn Binomial(chunk, k/n), the total is then
corrected to exactly k by removing (or adding) uniformly chosen entries, and positions are drawn uniformly inside
each chunk. Every step is exchangeable, so the result is uniform over k-subsets. Seeded with numpy's PCG64
(``numpy.random.default_rng``); the numpy version is recorded since its streams may change between releases.
For ``per_tensor`` each tensor has its own stream seeded by (seed, crc32(name)), so a tensor's bits do not depend
on the other tensors.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.masks.io import pack_bool, packed_size
from rlsubnet.masks.mask import OPERAND, Mask

SCOPES = ("per_tensor", "global")
CHUNK = 1 << 22  # entries per sampling chunk (a multiple of 8)


def _chunks(numel: int) -> list[int]:
    return [min(CHUNK, numel - s) for s in range(0, numel, CHUNK)]


def split_count(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """Counts per segment of a uniformly random k-subset of sum(sizes) entries (exact, any size)."""
    n = int(sum(sizes))
    if not 0 <= k <= n:
        raise UsageError(f"cannot choose {k} of {n} entries")
    if n == 0:
        return [0] * len(sizes)
    p = k / n
    counts = [int(rng.binomial(s, p)) if s else 0 for s in sizes]
    c = sum(counts)
    if c == k:
        return counts
    # Remove (or add) |c - k| entries chosen uniformly among the chosen (or unchosen) ones.
    pool = counts if c > k else [s - x for s, x in zip(sizes, counts)]
    total = sum(pool)
    picks = np.sort(rng.choice(total, abs(c - k), replace=False))
    edges = np.cumsum(pool)
    per_segment = np.bincount(np.searchsorted(edges, picks, side="right"), minlength=len(sizes))
    sign = -1 if c > k else 1
    return [x + sign * int(d) for x, d in zip(counts, per_segment)]


def _sample_chunk(size: int, k: int, rng: np.random.Generator) -> np.ndarray:
    flags = np.zeros(size, dtype=bool)
    if k * 2 <= size:
        flags[rng.choice(size, k, replace=False)] = True
    else:  # choose the complement: cheaper when k > size / 2
        flags[:] = True
        flags[rng.choice(size, size - k, replace=False)] = False
    return flags


def _tensor_bits(numel: int, chunk_counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    out = np.empty(packed_size(numel), dtype=np.uint8)
    for i, (size, k) in enumerate(zip(_chunks(numel), chunk_counts)):
        bits = pack_bool(_sample_chunk(size, k, rng))
        out[i * CHUNK // 8 : i * CHUNK // 8 + bits.size] = bits
    return out


def random_mask(
    like: Mask | Mapping[str, Sequence[int]],
    *,
    scope: str = "per_tensor",
    seed: int = 0,
    density: float | None = None,
) -> Mask:
    """A random mask over the tensors of ``like`` (a Mask, or name -> shape).

    With ``like`` a Mask and ``density=None`` the counts match it exactly (per tensor or in total, by ``scope``);
    with ``density`` given each tensor (``per_tensor``) or the whole model (``global``) gets round(density × n).
    """
    seed = limits.seed(seed, "the random-mask seed")
    scope = scope.replace("-", "_")
    if scope not in SCOPES:
        raise UsageError(f"unknown random-mask scope {scope!r} (choose per_tensor or global)")
    if isinstance(like, Mask):
        shapes = like.shapes
    else:
        shapes = {n: tuple(limits.integer(x, f"shape of {n!r}", 0) for x in s) for n, s in like.items()}
    numels = {n: math.prod(s) for n, s in shapes.items()}
    if not sum(numels.values()):
        raise UsageError(f"the reference covers no parameters ({len(numels)} tensors, all empty): no density to match")
    if density is None:
        if not isinstance(like, Mask):
            raise UsageError("give density= when the reference is not a mask")
        targets = like.counts
    else:
        density = limits.real(density, "density", 0.0, 1.0)
        targets = {n: round(density * v) for n, v in numels.items()}
    total = sum(targets.values()) if density is None else round(density * sum(numels.values()))

    packed: dict[str, np.ndarray] = {}
    if scope == "per_tensor":
        for name, numel in numels.items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            chunk_counts = split_count(_chunks(numel), targets[name], rng)
            packed[name] = _tensor_bits(numel, chunk_counts, rng)
    else:
        rng = np.random.default_rng(seed)
        sizes, owners = [], []
        for name, numel in numels.items():
            for size in _chunks(numel):
                sizes.append(size)
                owners.append(name)
        counts = split_count(sizes, total, rng)
        by_name: dict[str, list[int]] = {n: [] for n in numels}
        for name, c in zip(owners, counts):
            by_name[name].append(c)
        for name, numel in numels.items():
            packed[name] = _tensor_bits(numel, by_name[name], rng)

    ref = like if isinstance(like, Mask) else None
    meta = {
        "kind": "random",
        "atol": ref.atol if ref else None,
        "dtype": ref.mode if ref else None,
        "base": ref.meta.get("base") if ref else None,
        "tuned": None,
        "extra": {
            "random": {
                "scope": scope,
                "seed": int(seed),
                "density": density if density is not None else (ref.density if ref else None),
                "matched": "counts of the reference mask" if density is None else "round(density * numel)",
                "generator": f"numpy.random.default_rng (PCG64), numpy {np.__version__}",
            },
            "operands": [ref.describe(OPERAND)] if ref else [],
        },
    }
    return Mask(shapes, packed, meta)
