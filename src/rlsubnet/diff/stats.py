"""Per-tensor update statistics, accumulated block by block. Pure functions over tensors: no files here.

Definitions (``shared/paper.md`` §2): Δ = tuned − base computed in the comparison dtype; an entry is *unchanged*
at ``atol`` when ``torch.isclose(Δ, 0, atol=atol)``, i.e. |Δ| ≤ atol where torch rounds atol to Δ's dtype
first (in bf16, atol 1e-5 is 1.0014e-5). ``density`` = changed / numel, ``sparsity`` = 1 − density.

Speed: the tolerance test runs on the bit patterns. For a float of any width, |x| ≤ t ⇔ (bits(x) with the sign
cleared) ≤ bits(t) whenever x is not NaN, and NaN patterns sort above every threshold (so NaN counts as changed,
as in ``isclose``). One integer compare per atol replaces isclose's five float ops, and sub-blocks sized for the
CPU cache keep every pass in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlsubnet.errors import UsageError

COMPARE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "native": None}
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_ABS_MASK = {2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}
SUB_BLOCK = 1 << 19  # elements per pass: bf16 pairs plus temporaries stay within a few MB of cache


def comparison_dtype(mode: str, base_dtype: torch.dtype, tuned_dtype: torch.dtype) -> torch.dtype:
    """The dtype Δ is computed in.

    ``bf16`` (the paper's choice) casts floats to bfloat16; ``fp32`` casts to float32; ``native`` keeps the
    stored dtype (the promoted one if the two sides differ). Non-float tensors always compare in their own
    dtype, bitwise. float8 has no arithmetic in torch, so it is compared in bfloat16, which holds it exactly.
    """
    if mode not in COMPARE_DTYPES:
        raise UsageError(f"unknown comparison dtype {mode!r} (choose from {', '.join(COMPARE_DTYPES)})")
    if not (base_dtype.is_floating_point and tuned_dtype.is_floating_point):
        return torch.promote_types(base_dtype, tuned_dtype)
    wanted = COMPARE_DTYPES[mode]
    if wanted is not None:
        return wanted
    dtype = torch.promote_types(base_dtype, tuned_dtype)
    if dtype.itemsize == 1:
        return torch.bfloat16
    return dtype


def atol_threshold(atol: float, dtype: torch.dtype) -> float:
    """The tolerance torch.isclose effectively applies to a Δ of ``dtype``: atol rounded to that dtype."""
    if atol < 0 or math.isnan(atol):
        raise UsageError(f"atol must be a non-negative number, got {atol}")
    if not dtype.is_floating_point:
        return float(atol)
    return float(torch.tensor(atol, dtype=dtype).item())


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
        rec = {
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


class DeltaAccumulator:
    """Accumulate the statistics of one tensor pair from consecutive flat blocks.

    >>> acc = DeltaAccumulator("w", (4, 4), torch.bfloat16, torch.bfloat16, atols=(0.0, 1e-5))
    >>> acc.update(base_block, tuned_block)   # any number of times, in order
    >>> stats = acc.finish()
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        base_dtype: torch.dtype,
        tuned_dtype: torch.dtype,
        atols: tuple[float, ...] = (0.0, 1e-5),
        dtype: str = "bf16",
        rank: bool = False,
    ):
        if not atols:
            raise UsageError("at least one atol is needed")
        self.name = name
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.base_dtype, self.tuned_dtype = base_dtype, tuned_dtype
        self.cmp = comparison_dtype(dtype, base_dtype, tuned_dtype)
        self.atols = tuple(float(a) for a in atols)
        self.is_float = self.cmp.is_floating_point
        if self.is_float:
            size = self.cmp.itemsize
            self._int = _INT_OF[size]
            self._abs_mask = _ABS_MASK[size]
            self._thr_bits = [int(torch.tensor(atol_threshold(a, self.cmp), dtype=self.cmp).view(self._int)) for a in self.atols]
            self._max_atol_bits = max(self._thr_bits)
            self._nan_floor = int(torch.tensor(float("inf"), dtype=self.cmp).view(self._int))  # bits above: NaN
        self.unchanged = [0] * len(self.atols)
        self.nonzero = 0
        self.max_bits = 0
        self.abs_sum = 0.0
        self.sq_sum = 0.0
        self.base_sq = 0.0
        self.nonfinite = {"base_nan": 0, "base_inf": 0, "tuned_nan": 0, "tuned_inf": 0, "delta_nonfinite": 0}
        self.seen = 0
        self.want_rank = rank and len(self.shape) == 2 and self.is_float
        self._full_delta = torch.empty(self.shape, dtype=torch.float32).reshape(-1) if self.want_rank else None

    def update(self, base: torch.Tensor, tuned: torch.Tensor) -> None:
        base, tuned = base.reshape(-1), tuned.reshape(-1)
        if base.numel() != tuned.numel():
            raise ValueError(f"{self.name}: block sizes differ ({base.numel()} vs {tuned.numel()})")
        for start in range(0, base.numel(), SUB_BLOCK):
            self._update_sub(base[start : start + SUB_BLOCK], tuned[start : start + SUB_BLOCK])

    def _update_sub(self, base: torch.Tensor, tuned: torch.Tensor) -> None:
        n = base.numel()
        b = base.to(self.cmp)
        t = tuned.to(self.cmp)
        if not self.is_float:
            diff = torch.count_nonzero(b != t).item()
            self.unchanged = [u + n - diff for u in self.unchanged]
            self.nonzero += diff
            self.seen += n
            return
        d = t - b
        bits = d.view(self._int) & self._abs_mask
        for i, thr in enumerate(self._thr_bits):
            self.unchanged[i] += torch.count_nonzero(bits <= thr).item()
        self.nonzero += torch.count_nonzero(bits).item()
        block_max = bits.max().item()
        if self._full_delta is not None:
            self._full_delta[self.seen : self.seen + n] = d
        self.seen += n
        df = d.float()
        bf = b.float()
        abs_sum = torch.linalg.vector_norm(df, 1).item()
        sq_sum = torch.dot(df, df).item()
        base_sq = torch.dot(bf, bf).item()
        if block_max >= self._nan_floor or not math.isfinite(abs_sum + sq_sum + base_sq):
            # Rare path: NaN or Inf somewhere (or an fp32 overflow of the sums). Count them and
            # reduce the finite part in float64.
            self._count_nonfinite(b, t, d)
            finite = torch.isfinite(d) & torch.isfinite(b)
            df64, bf64 = d[finite].double(), b[finite].double()
            abs_sum, sq_sum = df64.abs().sum().item(), df64.square().sum().item()
            base_sq = bf64.square().sum().item()
            block_max = (bits[finite].max().item() if finite.any() else 0)
        self.max_bits = max(self.max_bits, block_max)
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.base_sq += base_sq

    def _count_nonfinite(self, b: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> None:
        nf = self.nonfinite
        nf["base_nan"] += torch.isnan(b).sum().item()
        nf["base_inf"] += torch.isinf(b).sum().item()
        nf["tuned_nan"] += torch.isnan(t).sum().item()
        nf["tuned_inf"] += torch.isinf(t).sum().item()
        nf["delta_nonfinite"] += (~torch.isfinite(d)).sum().item()

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
            compare_dtype=str(self.cmp).removeprefix("torch."),
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
            stats.max_abs_delta = float(torch.tensor(self.max_bits, dtype=self._int).view(self.cmp).float())
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
    dtype: str = "bf16",
    rank: bool = False,
) -> TensorStats:
    """Statistics of one in-memory tensor pair (convenience over :class:`DeltaAccumulator`)."""
    if base.shape != tuned.shape:
        raise ValueError(f"{name}: shapes differ ({list(base.shape)} vs {list(tuned.shape)})")
    acc = DeltaAccumulator(name, tuple(base.shape), base.dtype, tuned.dtype, atols, dtype, rank)
    acc.update(base, tuned)
    return acc.finish()
