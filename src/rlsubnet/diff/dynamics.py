"""Per-entry views the compare engine does not give: training dynamics across snapshots, and the probability
that a weight changed as a function of its magnitude. Pure functions over tensors: no files here.

"Changed" is the engine's test exactly (:mod:`rlsubnet.diff.changed`): Δ = tuned − base computed in the
comparison dtype, unchanged when |Δ| ≤ atol rounded to that dtype, NaN counted as changed. Counts made here
therefore agree with the engine's to the entry, which the demo checks.

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
from rlsubnet.diff.changed import changed_mask, changed_masks, legacy_mode


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

    def add(self, other: DynamicsCounts) -> None:
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


class DecompositionTracker:
    """The never / returned / final decomposition of one run, fed its states one at a time in training order.

    >>> tracker = DecompositionTracker(theta0, atols=(0.0, 1e-5))
    >>> for state in states: tracker.update(state)      # snapshots, or the weights after every step
    >>> [c.to_record() for c in tracker.counts()]        # the last state is the final model

    ``base`` and every state map tensor names to tensors; every tensor of ``base`` must be in each state. Memory:
    one bool per entry and atol (which entries have differed from ``base`` so far).
    """

    def __init__(
        self, base: Mapping[str, torch.Tensor], atols: Sequence[float] = (0.0, 1e-5), mode: str = "bf16", **legacy
    ):
        self.mode = legacy_mode(mode, legacy)
        self.base = base
        self.atols = [limits.atol(a) for a in atols]
        self.ever = {name: [torch.zeros(b.shape, dtype=torch.bool) for _ in self.atols] for name, b in base.items()}
        self.last: Mapping[str, torch.Tensor] | None = None

    def _changed(self, name: str, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if name not in state:
            raise KeyError(f"tensor {name!r} is missing from a snapshot")
        return changed_masks(self.base[name], state[name], self.atols, self.mode)

    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        for name in self.base:
            for ever, m in zip(self.ever[name], self._changed(name, state)):
                ever |= m
        self.last = state

    def counts(self, final: Mapping[str, torch.Tensor] | None = None) -> list[DynamicsCounts]:
        """Pooled counts per atol; ``final``: the final model (default: the last state given to :meth:`update`)."""
        final = self.last if final is None else final
        if final is None:
            raise ValueError("at least one snapshot (the final model) is needed")
        totals = [DynamicsCounts(atol=a) for a in self.atols]
        for name, b in self.base.items():
            n = b.numel()
            for total, ever, fin in zip(totals, self.ever[name], self._changed(name, final)):
                # Every final change is also an "ever" change, so ever = returned + final exactly.
                n_ever, n_final = int((ever | fin).sum()), int(fin.sum())
                total.add(
                    DynamicsCounts(atol=total.atol, numel=n, never=n - n_ever, returned=n_ever - n_final, final=n_final)
                )
        return totals


def decompose_tensor(
    base: torch.Tensor,
    snapshots: Iterable[torch.Tensor],
    atols: Sequence[float] = (0.0, 1e-5),
    mode: str = "bf16",
    **legacy,
) -> list[DynamicsCounts]:
    """Decompose one tensor's entries given its snapshots in training order (the last is the final model)."""
    tracker = DecompositionTracker({"": base}, atols, legacy_mode(mode, legacy))
    for snap in snapshots:
        tracker.update({"": snap})
    return tracker.counts()


def decompose(
    base: Mapping[str, torch.Tensor],
    snapshots: Sequence[Mapping[str, torch.Tensor]],
    atols: Sequence[float] = (0.0, 1e-5),
    mode: str = "bf16",
    **legacy,
) -> list[DynamicsCounts]:
    """Pooled decomposition over every tensor of ``base``; each snapshot must hold the same tensors."""
    tracker = DecompositionTracker(base, atols, legacy_mode(mode, legacy))
    for snap in snapshots:
        tracker.update(snap)
    return tracker.counts()


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

    def update(self, base: torch.Tensor, tuned: torch.Tensor, mode: str = "bf16") -> None:
        mag = base.detach().float().abs().reshape(-1)
        bounds = torch.tensor(self.edges[1:-1], dtype=torch.float32)
        # bucket i holds edges[i] <= |w| < edges[i+1]
        idx = torch.bucketize(mag, bounds, right=True)
        nb = len(self.edges) - 1
        counts = torch.bincount(idx, minlength=nb)
        for i in range(nb):
            self.numel[i] += int(counts[i])
        for j, a in enumerate(self.atols):
            m = changed_mask(base, tuned, a, mode).reshape(-1)
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
    mode: str = "bf16",
    edges: Sequence[float] | None = None,
    **legacy,
) -> MagnitudeCounts:
    """P(changed | |w_base| bucket), pooled over every tensor of ``base``."""
    mode = legacy_mode(mode, legacy)
    counts = MagnitudeCounts(edges=list(edges or magnitude_edges()), atols=tuple(limits.atol(a) for a in atols))
    for name, b in base.items():
        if name not in tuned:
            raise KeyError(f"tensor {name!r} is missing from the tuned side")
        counts.update(b, tuned[name], mode)
    return counts


def bf16_half_ulp(magnitude: float) -> float:
    """Half a bf16 step at |w| = ``magnitude``: a master weight must drift further than this to change in bf16."""
    if magnitude <= 0:
        return 2.0**-134  # half the smallest subnormal
    e = math.floor(math.log2(magnitude))
    return 2.0 ** (max(e, -126) - 7) / 2
