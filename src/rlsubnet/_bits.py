"""Integer views of floats' bit patterns, by element width: the one table every bit-level pass uses.

Signed views are for tests on magnitudes (a float's bits with the sign cleared order like |x|, see
:mod:`rlsubnet.diff.changed`); unsigned views are for XOR and copies of raw words (patches). One-byte
elements are viewed as uint8 on both sides: torch's bitwise ops and numpy agree on it everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

WIDTHS = (1, 2, 4, 8)
TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
NUMPY_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
NUMPY_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
ABS_MASK = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFF_FFFF, 8: 0x7FFF_FFFF_FFFF_FFFF}  # every bit but the sign
# Bits set in each byte value: popcount of packed masks without unpacking them.
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def int_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as a signed integer tensor of the same width (integer tensors come back as they are)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.view(TORCH_INT[t.element_size()])
    return t


def words(raw: np.ndarray, width: int) -> np.ndarray:
    """A uint8 array's bytes as unsigned words of ``width`` bytes (a view, no copy)."""
    return raw.view(NUMPY_UINT[width])


def tensor_words(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bits as unsigned words of its element width (a view of its memory)."""
    return words(t.reshape(-1).view(torch.uint8).numpy(), t.element_size())


def as_tensor(raw: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A uint8 array's bytes as a 1-D tensor of ``dtype`` (a view, no copy)."""
    if not raw.size:  # torch refuses to re-type an empty view (its stride is 0)
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(raw).view(dtype)
