"""The changed-test: which entries of a tensor pair differ, the one definition every measurement uses.

Δ = tuned − base is computed in the comparison dtype the mode picks (:func:`comparison_dtype`), and an entry is
*unchanged* at ``atol`` when ``torch.isclose(Δ, 0, atol=atol, rtol=0)``: |Δ| ≤ atol, where torch first rounds
atol to Δ's dtype (in bf16, atol 1e-5 is 1.0014e-5). The compare engine's counts, a mask's bits, the per-step
tracker and the snapshot decomposition all run this test, so they agree to the entry.

The test runs on bit patterns: for a float of any width, |x| ≤ t ⇔ (bits(x) with the sign cleared) ≤ bits(t)
whenever x is not NaN, and NaN patterns sort above every threshold, so NaN is never equal (as in ``isclose``).
−0.0 is 0: a tolerance of −0.0 is read as 0.0 (its sign bit would make every entry changed), and a Δ of −0.0
is unchanged. One integer compare per atol replaces isclose's five float ops. Non-float tensors compare in
their own (promoted) dtype, bitwise.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet._bits import ABS_MASK, NUMPY_INT, TORCH_INT
from rlsubnet.errors import UsageError

COMPARE_MODES = limits.COMPARE_MODES
_MODE_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "native": None}


def comparison_dtype(mode: str, base_dtype: torch.dtype, tuned_dtype: torch.dtype) -> torch.dtype:
    """The dtype Δ is computed in.

    ``bf16`` (the paper's choice) casts floats to bfloat16; ``fp32`` casts to float32; ``native`` keeps the
    stored dtype (the promoted one if the two sides differ). Non-float tensors always compare in their own
    dtype, bitwise. float8 has no arithmetic in torch, so it is compared in bfloat16, which holds it exactly.
    """
    limits.mode(mode)
    # torch cannot promote float8 with any other dtype either: it enters as the bfloat16 that holds it
    base_dtype, tuned_dtype = (
        torch.bfloat16 if d.is_floating_point and d.itemsize == 1 else d for d in (base_dtype, tuned_dtype)
    )
    if not (base_dtype.is_floating_point and tuned_dtype.is_floating_point):
        return torch.promote_types(base_dtype, tuned_dtype)
    wanted = _MODE_DTYPE[mode]
    return wanted if wanted is not None else torch.promote_types(base_dtype, tuned_dtype)


def atol_threshold(atol: float, cmp_dtype: torch.dtype) -> float:
    """The tolerance torch.isclose effectively applies to a Δ of ``cmp_dtype``: atol rounded to that dtype.

    −0.0 is 0: its sign bit set, its bit pattern read as a threshold would call every entry changed."""
    atol = limits.atol(atol)
    if not cmp_dtype.is_floating_point:
        return atol
    rounded = float(torch.tensor(atol, dtype=cmp_dtype).item())
    if math.isinf(rounded):
        # An infinite threshold would call an infinite Δ unchanged, which torch.isclose never does.
        raise UsageError(f"atol {atol:g} is beyond the largest {str(cmp_dtype).removeprefix('torch.')} value")
    return rounded


def threshold_bits(atol: float, cmp_dtype: torch.dtype) -> int:
    """Bit pattern of the effective tolerance: |x| ≤ atol ⇔ (bits(x) & ABS_MASK) ≤ this."""
    atol = limits.atol(atol)
    # The cache is keyed on the float's bit pattern, not its value: -0.0 == 0.0 to a dict, and a threshold
    # computed for one must never be handed out for the other.
    return _threshold_bits(struct.unpack("<Q", struct.pack("<d", atol))[0], cmp_dtype)


@functools.lru_cache(maxsize=256)
def _threshold_bits(atol_bits: int, cmp_dtype: torch.dtype) -> int:
    atol = struct.unpack("<d", struct.pack("<Q", atol_bits))[0]
    return int(torch.tensor(atol_threshold(atol, cmp_dtype), dtype=cmp_dtype).view(TORCH_INT[cmp_dtype.itemsize]))


class ChangedTest:
    """The changed-test for one tensor pair at one or more tolerances, on flat blocks.

    >>> test = ChangedTest(torch.bfloat16, torch.float32, atols=(0.0, 1e-5), mode="bf16")
    >>> test.changed(base_block, tuned_block)        # one flat numpy bool array per atol
    >>> bits = test.abs_bits(test.delta(b, t))       # the pieces, for passes that also reduce Δ
    >>> test.count_unchanged(bits, np.count_nonzero(bits))
    """

    def __init__(
        self,
        base_dtype: torch.dtype,
        tuned_dtype: torch.dtype,
        atols: float | Sequence[float] = 1e-5,
        mode: str = "bf16",
    ):
        self.cmp_dtype = comparison_dtype(mode, base_dtype, tuned_dtype)
        self.atols = tuple(limits.atol(a) for a in ((atols,) if isinstance(atols, (int, float)) else atols))
        if not self.atols:
            raise UsageError("at least one atol is needed")
        self.is_float = self.cmp_dtype.is_floating_point
        if self.is_float:
            width = self.cmp_dtype.itemsize
            self.int_dtype, self.np_int, self.abs_mask = TORCH_INT[width], NUMPY_INT[width], ABS_MASK[width]
            self.thresholds = [threshold_bits(a, self.cmp_dtype) for a in self.atols]
            # bit patterns above +inf's are NaN
            self.nan_floor = int(torch.tensor(math.inf, dtype=self.cmp_dtype).view(self.int_dtype))

    def delta(self, base: torch.Tensor, tuned: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = tuned − base in the comparison dtype, flat."""
        return torch.sub(tuned.reshape(-1).to(self.cmp_dtype), base.reshape(-1).to(self.cmp_dtype), out=out)

    def abs_bits(self, delta: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """|Δ|'s bit pattern (the sign cleared) as signed integers: ordered like |Δ|, NaN above everything."""
        return np.bitwise_and(delta.view(self.int_dtype).numpy(), self.abs_mask, out=out)

    def count_unchanged(self, bits: np.ndarray, nonzero: int, out: np.ndarray | None = None) -> list[int]:
        """Entries with |Δ| ≤ atol, per atol, from :meth:`abs_bits` (``nonzero``: its count of non-zero entries)."""
        n = bits.size
        return [
            n - nonzero if thr == 0 else int(np.count_nonzero(np.less_equal(bits, thr, out=out)))
            for thr in self.thresholds
        ]

    def changed(self, base: torch.Tensor, tuned: torch.Tensor) -> list[np.ndarray]:
        """Flat boolean arrays, one per atol: True where the entry changed."""
        if not self.is_float:
            b, t = base.reshape(-1).to(self.cmp_dtype), tuned.reshape(-1).to(self.cmp_dtype)
            return [(b != t).numpy() for _ in self.atols]
        bits = self.abs_bits(self.delta(base, tuned))
        return [np.greater(bits, thr) for thr in self.thresholds]


def changed_masks(
    base: torch.Tensor, tuned: torch.Tensor, atols: Sequence[float], mode: str = "bf16", **legacy
) -> list[torch.Tensor]:
    """Boolean tensors in ``base``'s shape, one per atol: True where ``tuned`` differs from ``base`` by more
    than atol (Δ computed once)."""
    mode = legacy_mode(mode, legacy)
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {list(base.shape)} vs {list(tuned.shape)}")
    test = ChangedTest(base.dtype, tuned.dtype, atols, mode)
    return [torch.from_numpy(m).reshape(base.shape) for m in test.changed(base.detach().cpu(), tuned.detach().cpu())]


def changed_mask(
    base: torch.Tensor, tuned: torch.Tensor, atol: float = 1e-5, mode: str = "bf16", **legacy
) -> torch.Tensor:
    """Boolean tensor in ``base``'s shape: True where ``tuned`` differs from ``base`` by more than ``atol``."""
    return changed_masks(base, tuned, (atol,), legacy_mode(mode, legacy))[0]


def legacy_mode(mode: str, legacy: dict) -> str:
    """``mode``, checked; or the value of ``dtype=``, the keyword the mode had before it had its own name,
    which callers written then still pass. Any other keyword is an error, as it would be without ``**legacy``."""
    if "dtype" in legacy:
        warnings.warn(
            "the comparison mode is passed as mode=...; dtype=... is deprecated", DeprecationWarning, stacklevel=3
        )
        mode = legacy.pop("dtype")
    if legacy:
        raise TypeError(f"unexpected keyword argument {next(iter(legacy))!r}")
    return limits.mode(mode)
