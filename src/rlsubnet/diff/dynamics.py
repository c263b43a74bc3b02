"""Per-entry views the compare engine does not give: training dynamics across snapshots, and the probability
that a weight changed as a function of its magnitude. Pure functions over tensors: no files here.

"Changed" is the engine's test exactly (``rlsubnet.diff.stats``): Δ = tuned − base computed in the comparison
dtype, unchanged when |Δ| ≤ atol rounded to that dtype, NaN counted as changed. Counts made here therefore agree
with the engine's to the entry, which the demo checks.

Dynamics (the paper's decomposition). Given θ0 and snapshots θ1 … θK of one run (θK the final model), each
entry falls in exactly one of
- **never changed**: equal to θ0 (within atol) at every snapshot;
- **changed and returned**: differs from θ0 at some snapshot but not at the end (updated, then cancelled);
- **final subnetwork**: differs from θ0 at the end (the run's mask).
The three shares sum to 1. What counts as "ever changed" depends on how often snapshots were taken (a change
that is made and undone between two snapshots is invisible), so every figure carries the snapshot interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rlsubnet import limits
from rlsubnet.diff.stats import comparison_dtype, threshold_bits


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_ABS_MASK = {2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}


def changed_mask(base: torch.Tensor, tuned: torch.Tensor, atol: float = 1e-5, dtype: str = "bf16") -> torch.Tensor:
    """Boolean tensor: True where ``tuned`` differs from ``base`` by more than ``atol`` (the engine's test)."""
    return changed_masks(base, tuned, (atol,), dtype)[0]


def changed_masks(base: torch.Tensor, tuned: torch.Tensor, atols: Sequence[float], dtype: str = "bf16") -> list[torch.Tensor]:
    """:func:`changed_mask` at several tolerances, computing Δ once."""
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {list(base.shape)} vs {list(tuned.shape)}")
    atols = [limits.atol(a) for a in atols]
    cmp = comparison_dtype(dtype, base.dtype, tuned.dtype)
    if not cmp.is_floating_point:
        return [base.to(cmp) != tuned.to(cmp) for _ in atols]
    d = tuned.to(cmp) - base.to(cmp)
    # The engine's test on the bit patterns: |d| <= t  <=>  bits(|d|) <= bits(t) for non-NaN d, and NaN patterns
    # sort above every threshold (a NaN counts as changed, as in isclose). Integer compares are also much faster
    # than bf16 arithmetic on a CPU.
    size = cmp.itemsize
    bits = d.contiguous().view(_INT_OF[size]) & _ABS_MASK[size]
    return [bits > threshold_bits(a, cmp) for a in atols]


@dataclass
class DynamicsCounts:
    """Entry counts of the never / returned / final decomposition at one atol (numel-weighted, pooled)."""

    atol: float
    numel: int = 0
    never: int = 0
    returned: int = 0
    final: int = 0

    @property
    def ever(self) -> int:
        return self.returned + self.final

    def add(self, other: "DynamicsCounts") -> None:
        self.numel += other.numel
        self.never += other.never
        self.returned += other.returned
        self.final += other.final

    def to_record(self) -> dict:
        n = self.numel or 1
        return {
            "atol": self.atol,
            "numel": self.numel,
            "never": self.never,
            "returned": self.returned,
            "final": self.final,
            "ever": self.ever,
            "never_share": self.never / n,
            "returned_share": self.returned / n,
            "final_share": self.final / n,  # = the final density against θ0
            "returned_share_of_ever": self.returned / self.ever if self.ever else 0.0,
        }


class Decomposition:
    """The decomposition built one snapshot at a time (the last one added is the final model), so that a run can be
    decomposed after every optimizer step without keeping its snapshots: per tensor it keeps only which entries
    have differed from the base so far, and which differ in the latest snapshot."""

    def __init__(self, base: Mapping[str, torch.Tensor], atols: Sequence[float] = (0.0, 1e-5), dtype: str = "bf16"):
        self.base = base
        self.atols = tuple(limits.atol(a) for a in atols)
        self.dtype = dtype
        self.snapshots = 0
        self._ever = {n: [torch.zeros(b.shape, dtype=torch.bool) for _ in self.atols] for n, b in base.items()}
        self._last: dict[str, list[torch.Tensor]] = {}

    def add(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        for name, b in self.base.items():
            if name not in snapshot:
                raise KeyError(f"tensor {name!r} is missing from a snapshot")
            masks = changed_masks(b, snapshot[name], self.atols, self.dtype)
            for e, m in zip(self._ever[name], masks):
                e |= m
            self._last[name] = masks
        self.snapshots += 1

    def counts(self) -> list[DynamicsCounts]:
        """Pooled counts per atol, the latest snapshot taken as the final model."""
        if not self.snapshots:
            raise ValueError("at least one snapshot (the final model) is needed")
        totals = [DynamicsCounts(atol=a) for a in self.atols]
        for name, b in self.base.items():
            n = b.numel()
            for total, a, e, f in zip(totals, self.atols, self._ever[name], self._last[name]):
                n_ever, n_final = int(e.sum()), int(f.sum())
                # Every final change is also an "ever" change, so ever = returned + final exactly.
                total.add(DynamicsCounts(atol=a, numel=n, never=n - n_ever, returned=n_ever - n_final, final=n_final))
        return totals


def decompose(
    base: Mapping[str, torch.Tensor],
    snapshots: Iterable[Mapping[str, torch.Tensor]],
    atols: Sequence[float] = (0.0, 1e-5),
    dtype: str = "bf16",
) -> list[DynamicsCounts]:
    """Pooled decomposition over every tensor of ``base``, given its snapshots in training order (the last is the
    final model); each snapshot must hold the same tensors."""
    d = Decomposition(base, atols, dtype)
    for snap in snapshots:
        d.add(snap)
    return d.counts()


def decompose_tensor(
    base: torch.Tensor, snapshots: Iterable[torch.Tensor], atols: Sequence[float] = (0.0, 1e-5), dtype: str = "bf16"
) -> list[DynamicsCounts]:
    """:func:`decompose` for one tensor."""
    return decompose({"tensor": base}, ({"tensor": s} for s in snapshots), atols, dtype)


# -- P(changed | |w|): the precision mechanism

def magnitude_edges(lo_exp: int = -16, hi_exp: int = 0) -> list[float]:
    """Bucket edges 0, 2^lo, 2^(lo+1), …, 2^hi, inf: one bucket per binade, where a bf16 ULP is constant."""
    return [0.0] + [2.0**e for e in range(lo_exp, hi_exp + 1)] + [math.inf]


@dataclass
class MagnitudeCounts:
    """Per |w| bucket of the base: how many entries, and how many changed at each atol."""

    edges: list[float]
    atols: tuple[float, ...]
    numel: list[int] = field(default_factory=list)
    changed: list[list[int]] = field(default_factory=list)  # [atol][bucket]

    def __post_init__(self):
        nb = len(self.edges) - 1
        if not self.numel:
            self.numel = [0] * nb
        if not self.changed:
            self.changed = [[0] * nb for _ in self.atols]

    def update(self, base: torch.Tensor, tuned: torch.Tensor, dtype: str = "bf16") -> None:
        mag = base.detach().float().abs().reshape(-1)
        bounds = torch.tensor(self.edges[1:-1], dtype=torch.float32)
        # bucket i holds edges[i] <= |w| < edges[i+1]
        idx = torch.bucketize(mag, bounds, right=True)
        nb = len(self.edges) - 1
        counts = torch.bincount(idx, minlength=nb)
        for i in range(nb):
            self.numel[i] += int(counts[i])
        for j, a in enumerate(self.atols):
            m = changed_mask(base, tuned, a, dtype).reshape(-1)
            ch = torch.bincount(idx[m], minlength=nb)
            for i in range(nb):
                self.changed[j][i] += int(ch[i])

    def to_record(self) -> dict:
        """Buckets with at least one entry: lower/upper edge, count and P(changed) per atol."""
        rows = []
        for i, n in enumerate(self.numel):
            if not n:
                continue
            rows.append(
                {
                    "lo": self.edges[i],
                    "hi": self.edges[i + 1] if math.isfinite(self.edges[i + 1]) else None,
                    "numel": n,
                    "p_changed": {repr(a): self.changed[j][i] / n for j, a in enumerate(self.atols)},
                }
            )
        return {"atols": list(self.atols), "buckets": rows}


def magnitude_profile(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    atols: Sequence[float] = (0.0, 1e-5),
    dtype: str = "bf16",
    edges: Sequence[float] | None = None,
) -> MagnitudeCounts:
    """P(changed | |w_base| bucket), pooled over every tensor of ``base``."""
    counts = MagnitudeCounts(edges=list(edges or magnitude_edges()), atols=tuple(limits.atol(a) for a in atols))
    for name, b in base.items():
        if name not in tuned:
            raise KeyError(f"tensor {name!r} is missing from the tuned side")
        counts.update(b, tuned[name], dtype)
    return counts


def bf16_half_ulp(magnitude: float) -> float:
    """Half a bf16 step at |w| = ``magnitude``: a master weight must drift further than this to change in bf16."""
    if magnitude <= 0:
        return 2.0**-134  # half the smallest subnormal
    e = math.floor(math.log2(magnitude))
    return 2.0 ** (max(e, -126) - 7) / 2
