"""Spectral metrics inside the streaming comparison: a matrix gathered from its blocks, measured, then dropped.

The metrics need whole matrices (their SVDs), so the engine hands every block of a matrix to a
:class:`SpectralCollector`, which copies it into a buffer of the matrix's size; when the last block is in, each
tuned side is measured against the base and its buffer freed. Memory: the base matrix and each tuned version of it
in their stored dtypes, plus, for one side at a time, its fp32 Δ and the factors of
:func:`~rlsubnet.diff.spectral.spectral_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlsubnet.diff.names import is_norm
from rlsubnet.diff.spectral import SpectralStats, aggregate, check_top_k, spectral_stats, summarise
from rlsubnet.diff.stats import update_rank


def wants_spectral(name: str, shape: Sequence[int], is_float: bool) -> bool:
    """The matrices the spectral metrics cover: 2-D, non-empty, floating point, not a norm's weight."""
    return len(shape) == 2 and math.prod(shape) > 0 and is_float and not is_norm(name)


@dataclass
class _Side:
    index: int  # which tuned checkpoint
    dtype: torch.dtype  # its stored dtype
    cmp_dtype: torch.dtype  # the comparison dtype W0, W1 and Δ are taken in
    data: torch.Tensor | None = None  # the tuned matrix, flat, once its first block is in


class SpectralCollector:
    """One matrix of the base and of each tuned checkpoint that holds it, filled block by block. Constructing
    one checks ``top_k`` against the shape and allocates nothing: the engine plans every matrix before it reads,
    and holds buffers for one at a time.

    >>> col = SpectralCollector(name, shape, base_dtype, [(0, tuned_dtype, cmp_dtype)], top_k=16)
    >>> col.update(block.start, base_block, [tuned_block])   # every block, in any order
    >>> for index, stats, rank in col.finish(rank=True): ...
    """

    def __init__(
        self,
        name: str,
        shape: Sequence[int],
        base_dtype: torch.dtype,
        sides: Sequence[tuple[int, torch.dtype, torch.dtype]],
        top_k: int,
    ):
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        check_top_k(top_k, self.shape, name)
        self.top_k = top_k
        self.base_dtype = base_dtype
        self.base: torch.Tensor | None = None
        self.sides = [_Side(i, dtype, cmp) for i, dtype, cmp in sides]
        self.finished = False

    def update(self, start: int, base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> None:
        """Copy one flat block (elements [start, start + len)) of the base and of each side, in ``sides`` order."""
        if self.finished:
            raise ValueError(f"{self.name}: update after finish")
        if self.base is None:
            numel = self.shape[0] * self.shape[1]
            self.base = torch.empty(numel, dtype=self.base_dtype)
            for side in self.sides:
                side.data = torch.empty(numel, dtype=side.dtype)
        stop = start + base.numel()
        self.base[start:stop] = base.reshape(-1)
        for side, t in zip(self.sides, tuned, strict=True):
            assert side.data is not None
            side.data[start:stop] = t.reshape(-1)

    def finish(self, rank: bool = False) -> list[tuple[int, SpectralStats, tuple[int, float] | None]]:
        """Measure each side against the base: (tuned index, its stats, and with ``rank`` the update's
        (rank, rank / min(m, n)) as :func:`~rlsubnet.diff.stats.update_rank` gives it, taken from the same
        spectrum where the metrics have it). The buffers are freed as it goes."""
        if self.finished:
            raise ValueError(f"{self.name}: finished twice")
        if self.base is None:
            raise ValueError(f"{self.name}: finish before any block")
        w0 = self.base.view(self.shape)
        out = []
        for side in self.sides:
            assert side.data is not None
            w0c = w0.to(side.cmp_dtype)
            w1c = side.data.view(self.shape).to(side.cmp_dtype)
            # Δ as the changed-test sees it: the subtraction rounded in the comparison dtype
            delta = torch.sub(w1c, w0c).float()
            stats = spectral_stats(w0c, w1c, delta, self.top_k, name=self.name)
            ranked: tuple[int, float] | None = None
            if rank:
                if stats.numerical_rank is not None:
                    ranked = (stats.numerical_rank, stats.numerical_rank / min(self.shape))
                else:  # a non-finite matrix, or Δ's spectrum only sketched
                    ranked = update_rank(delta)
            out.append((side.index, stats, ranked))
            side.data = None
            del w0c, w1c, delta
        self.base = None
        self.finished = True
        return out


@dataclass
class SpectralSummary:
    """The spectral metrics of one comparison: one :class:`SpectralStats` per matrix, pooled on demand."""

    top_k: int
    matrices: list[SpectralStats] = field(default_factory=list)

    def records(self) -> list[dict]:
        return [s.to_record() for s in self.matrices]

    def layers(self) -> list[dict]:
        """Per transformer block: the unweighted mean of each metric over its matrices."""
        return aggregate(self.records())["layers"]

    def modules(self) -> list[dict]:
        """Per module kind (q, k, ..., embed, head, other), as :meth:`layers`."""
        return aggregate(self.records())["modules"]

    def overall(self) -> dict:
        """The unweighted mean over every matrix."""
        return summarise(self.records())

    @property
    def nonfinite(self) -> list[str]:
        """Names of the matrices skipped for a NaN or Inf in W0, W1 or Δ."""
        return [s.name for s in self.matrices if s.nonfinite]

    def to_json(self) -> dict:
        records = self.records()
        pooled = aggregate(records)
        return {
            "top_k": self.top_k,
            "matrices": records,
            "layers": pooled["layers"],
            "modules": pooled["modules"],
            "global": summarise(records),
            "nonfinite": len(self.nonfinite),
        }
