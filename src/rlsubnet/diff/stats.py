"""Per-tensor update statistics, accumulated block by block. Pure functions over tensors: no files here.

Definitions (the paper's): Δ = tuned − base computed in the comparison dtype; an entry is *unchanged*
at ``atol`` when |Δ| ≤ atol rounded to Δ's dtype (the changed-test of :mod:`rlsubnet.diff.changed`).
``density`` = changed / numel, ``sparsity`` = 1 − density.

Speed: the test runs on bit patterns, and sub-blocks sized for the CPU cache keep every pass in cache. Integer
passes run in numpy, whose comparisons and counts are several times faster than torch's on the CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlsubnet._threads import map_pieces
from rlsubnet.diff.changed import ChangedTest, legacy_mode

SUB_BLOCK = 1 << 18  # elements per pass: a sub-block's operands and temporaries stay in the CPU cache


@dataclass
class TensorStats:
    """Everything measured for one tensor pair. Counts are exact integers; norms are fp32 reductions."""

    name: str
    shape: tuple[int, ...]
    numel: int
    base_dtype: str
    tuned_dtype: str
    compare_dtype: str
    atols: tuple[float, ...]
    changed: tuple[int, ...]  # one per atol, same order
    hidden: int  # Δ ≠ 0 but |Δ| ≤ the largest atol: changes the tolerance hides
    max_abs_delta: float | None
    mean_abs_delta: float | None
    delta_norm: float | None
    base_norm: float | None
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/Inf counts, only when there are any
    rank: int | None = None
    rank_ratio: float | None = None
    layer: int | None = None
    module: str = "other"

    @property
    def rel_norm(self) -> float | None:
        """‖Δ‖₂ / ‖W_base‖₂ (None when the base is all zeros or non-float)."""
        if self.delta_norm is None or not self.base_norm:
            return None
        return self.delta_norm / self.base_norm

    def density(self, atol: float) -> float:
        return self.changed[self.atols.index(atol)] / self.numel if self.numel else 0.0

    def to_record(self) -> dict:
        rec: dict[str, Any] = {
            "name": self.name,
            "layer": self.layer,
            "module": self.module,
            "shape": list(self.shape),
            "numel": self.numel,
            "base_dtype": self.base_dtype,
            "tuned_dtype": self.tuned_dtype,
            "compare_dtype": self.compare_dtype,
            "by_atol": [atol_record(a, self.numel, c) for a, c in zip(self.atols, self.changed)],
            "hidden_by_atol": self.hidden,
            "max_abs_delta": self.max_abs_delta,
            "mean_abs_delta": self.mean_abs_delta,
            "delta_norm": self.delta_norm,
            "base_norm": self.base_norm,
            "rel_norm": self.rel_norm,
        }
        if self.nonfinite:
            rec["nonfinite"] = dict(self.nonfinite)
        if self.rank is not None:
            rec["rank"] = self.rank
            rec["rank_ratio"] = self.rank_ratio
        return rec


def atol_record(atol: float, numel: int, changed: int) -> dict:
    """The per-atol figures every output uses: {"atol", "numel", "changed", "sparsity", "density"}."""
    density = changed / numel if numel else 0.0
    return {"atol": atol, "numel": numel, "changed": changed, "sparsity": 1.0 - density, "density": density}


_scratch = threading.local()


def _buffer(key: str, n: int, dtype) -> np.ndarray:
    """A per-thread scratch array of at least n elements (sub-blocks reuse memory instead of allocating)."""
    buf = getattr(_scratch, key, None)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = np.empty(max(n, SUB_BLOCK), dtype=dtype)
        setattr(_scratch, key, buf)
    return buf[:n]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """x upcast for the norms (float64 stays float64, everything else goes to float32), in a reused buffer."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.dtype == wide:
        return x
    buf = torch.from_numpy(_buffer("wide", x.numel(), np.float64 if wide == torch.float64 else np.float32))
    return buf.copy_(x)


@dataclass
class _Partial:
    """Statistics of one sub-block; partials are added in block order, so results do not depend on threads."""

    unchanged: list[int]
    nonzero: int
    max_bits: int
    abs_sum: float
    sq_sum: float
    base_sq: float
    nonfinite: dict[str, int] | None = None


class DeltaAccumulator:
    """Accumulate the statistics of one tensor pair from consecutive flat blocks.

    >>> acc = DeltaAccumulator("w", (4, 4), torch.bfloat16, torch.bfloat16, atols=(0.0, 1e-5))
    >>> acc.update(base_block, tuned_block)   # any number of times, in order
    >>> stats = acc.finish()

    Sub-blocks of a large block are reduced on a small thread pool (numpy and torch release the GIL); call
    inside :func:`rlsubnet._threads.single_threaded_torch` so torch's own intra-op threads do not fight the pool.
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        base_dtype: torch.dtype,
        tuned_dtype: torch.dtype,
        atols: tuple[float, ...] = (0.0, 1e-5),
        mode: str = "bf16",
        rank: bool = False,
    ):
        self.name = name
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.base_dtype, self.tuned_dtype = base_dtype, tuned_dtype
        self.test = ChangedTest(base_dtype, tuned_dtype, atols, mode)
        self.cmp_dtype = self.test.cmp_dtype
        self.atols = self.test.atols
        self.is_float = self.test.is_float
        self.unchanged = [0] * len(self.atols)
        self.nonzero = 0
        self.max_bits = 0
        self.abs_sum = 0.0
        self.sq_sum = 0.0
        self.base_sq = 0.0
        self.nonfinite = {"base_nan": 0, "base_inf": 0, "tuned_nan": 0, "tuned_inf": 0, "delta_nonfinite": 0}
        self.seen = 0
        self.want_rank = rank and len(self.shape) == 2 and self.is_float
        self._full_delta: torch.Tensor | None = (
            None  # the fp32 Δ for the rank, allocated on the first block: one matrix at a time
        )

    def update(self, base: torch.Tensor, tuned: torch.Tensor) -> None:
        base, tuned = base.reshape(-1), tuned.reshape(-1)
        n = base.numel()
        if n != tuned.numel():
            raise ValueError(f"{self.name}: block sizes differ ({n} vs {tuned.numel()})")
        if self.seen + n > self.numel:
            raise ValueError(f"{self.name}: more elements than the tensor's {self.numel}")

        def work(start: int) -> _Partial:
            stop = min(n, start + SUB_BLOCK)
            return self._reduce(base[start:stop], tuned[start:stop], self.seen + start)

        if self.want_rank and self._full_delta is None:
            self._full_delta = torch.empty(self.numel, dtype=torch.float32)
        for p in map_pieces(work, n, SUB_BLOCK):
            self._add(p)
        self.seen += n

    def _add(self, p: _Partial) -> None:
        self.unchanged = [u + c for u, c in zip(self.unchanged, p.unchanged)]
        self.nonzero += p.nonzero
        self.max_bits = max(self.max_bits, p.max_bits)
        self.abs_sum += p.abs_sum
        self.sq_sum += p.sq_sum
        self.base_sq += p.base_sq
        if p.nonfinite:
            for k, v in p.nonfinite.items():
                self.nonfinite[k] += v

    def _reduce(self, base: torch.Tensor, tuned: torch.Tensor, offset: int) -> _Partial:
        n = base.numel()
        b = base.to(self.cmp_dtype)
        t = tuned.to(self.cmp_dtype)
        if not self.is_float:
            same = n - int(torch.count_nonzero(b != t))
            return _Partial([same] * len(self.atols), n - same, 0, 0.0, 0.0, 0.0)
        test = self.test
        d = torch.from_numpy(_buffer("delta", n, test.np_int)).view(self.cmp_dtype)
        torch.sub(t, b, out=d)
        if self._full_delta is not None:
            self._full_delta[offset : offset + n] = d
        bits = test.abs_bits(d, out=_buffer("bits", n, test.np_int))
        nonzero = int(np.count_nonzero(bits))
        unchanged = test.count_unchanged(bits, nonzero, out=_buffer("mask", n, np.bool_))
        max_bits = int(bits.max())
        if max_bits >= test.nan_floor:
            return self._reduce_nonfinite(b, t, d, unchanged, nonzero)
        absd = _as_float(torch.from_numpy(bits).view(self.cmp_dtype))  # |Δ|: the sign-cleared bits
        abs_sum = float(absd.sum())
        sq_sum = float(torch.dot(absd, absd))
        bf = _as_float(b)
        base_sq = float(torch.dot(bf, bf))
        if not math.isfinite(abs_sum + sq_sum + base_sq):  # fp32 overflow of a sum: redo in float64
            df, bf = d.double(), b.double()
            abs_sum, sq_sum, base_sq = df.abs().sum().item(), df.square().sum().item(), bf.square().sum().item()
        return _Partial(unchanged, nonzero, max_bits, abs_sum, sq_sum, base_sq)

    def _reduce_nonfinite(self, b, t, d, unchanged, nonzero) -> _Partial:
        # Rare path: NaN or Inf in a sub-block. Count them; reduce the finite part in float64.
        nonfinite = {
            "base_nan": int(torch.isnan(b).sum()),
            "base_inf": int(torch.isinf(b).sum()),
            "tuned_nan": int(torch.isnan(t).sum()),
            "tuned_inf": int(torch.isinf(t).sum()),
            "delta_nonfinite": int((~torch.isfinite(d)).sum()),
        }
        finite = torch.isfinite(d) & torch.isfinite(b)
        df, bf = d[finite].double(), b[finite].double()
        bits = d[finite].view(self.test.int_dtype) & self.test.abs_mask
        max_bits = int(bits.max()) if bits.numel() else 0
        return _Partial(
            unchanged,
            nonzero,
            max_bits,
            df.abs().sum().item(),
            df.square().sum().item(),
            bf.square().sum().item(),
            nonfinite,
        )

    def finish(self) -> TensorStats:
        if self.seen != self.numel:
            raise ValueError(f"{self.name}: saw {self.seen} of {self.numel} elements")
        changed = tuple(self.numel - u for u in self.unchanged)
        stats = TensorStats(
            name=self.name,
            shape=self.shape,
            numel=self.numel,
            base_dtype=str(self.base_dtype).removeprefix("torch."),
            tuned_dtype=str(self.tuned_dtype).removeprefix("torch."),
            compare_dtype=str(self.cmp_dtype).removeprefix("torch."),
            atols=self.atols,
            changed=changed,
            hidden=self.nonzero - changed[self.atols.index(max(self.atols))],
            max_abs_delta=None,
            mean_abs_delta=None,
            delta_norm=None,
            base_norm=None,
            nonfinite={k: v for k, v in self.nonfinite.items() if v},
        )
        if self.is_float:
            finite_n = self.numel - self.nonfinite["delta_nonfinite"]
            stats.max_abs_delta = float(
                torch.tensor(self.max_bits, dtype=self.test.int_dtype).view(self.cmp_dtype).float()
            )
            stats.mean_abs_delta = self.abs_sum / finite_n if finite_n else None
            stats.delta_norm = math.sqrt(self.sq_sum)
            stats.base_norm = math.sqrt(self.base_sq)
        if self._full_delta is not None:
            stats.rank, stats.rank_ratio = update_rank(self._full_delta.reshape(self.shape))
            self._full_delta = None
        return stats


def update_rank(delta: torch.Tensor) -> tuple[int, float]:
    """Rank of an update matrix with PyTorch's default threshold, and rank / min(m, n) (the paper's §2)."""
    delta = delta.float()
    if not torch.isfinite(delta).all():
        delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
    full = min(delta.shape)
    if full == 0:
        return 0, 0.0
    r = int(torch.linalg.matrix_rank(delta).item())
    return r, r / full


def tensor_stats(
    name: str,
    base: torch.Tensor,
    tuned: torch.Tensor,
    atols: tuple[float, ...] = (0.0, 1e-5),
    mode: str = "bf16",
    rank: bool = False,
    **legacy,
) -> TensorStats:
    """Statistics of one in-memory tensor pair (convenience over :class:`DeltaAccumulator`)."""
    mode = legacy_mode(mode, legacy)
    if base.shape != tuned.shape:
        raise ValueError(f"{name}: shapes differ ({list(base.shape)} vs {list(tuned.shape)})")
    acc = DeltaAccumulator(name, tuple(base.shape), base.dtype, tuned.dtype, atols, mode, rank)
    acc.update(base, tuned)
    return acc.finish()
