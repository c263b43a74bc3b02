"""Ranges and choices of options, checked where a value enters (the CLI's parser and the public functions).

A value outside its range is a one-line :class:`~rlsubnet.errors.UsageError` naming the option, raised before
any work: unchecked, a negative count is a traceback deep inside numpy, a huge block size or bucket count is an
allocation of hundreds of GiB, and a NaN tolerance silently counts every entry as changed.
"""

from __future__ import annotations

import math
import numbers

from rlsubnet.errors import UsageError

MAX_SEED = 2**63 - 1  # seeds go to torch (uint64) and numpy; int64 keeps them exact in every record
MAX_BLOCK_BYTES = 1 << 30  # read / write block of the streaming passes; a few are held at once per side
MAX_ATOLS = 64  # every atol is one more pass over each block
MAX_BINS_PER_OCTAVE = 128  # a bf16 weight has 128 distinct mantissas per octave: finer buckets are empty
MAX_THREADS = 1024
MAX_JOBS = 256
MAX_STEPS = 10**9
MAX_BATCH = 1 << 16  # one batch is materialised at once
MAX_GENERATIONS = 1 << 12
# The comparison mode: the dtype Δ = tuned − base is computed in (see rlsubnet.diff.changed). Files written
# before the mode had its own name store it under the key "dtype" (mask metadata, compare JSON, results.json),
# and keep doing so: renaming the key would make existing files unreadable.
COMPARE_MODES = ("bf16", "fp32", "native")


def integer(value, name: str, lo: int, hi: float = math.inf) -> int:
    """``value`` as an int in [lo, hi]; bools, floats and out-of-range values are a UsageError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo:
        raise UsageError(f"{name} must be at least {lo}, got {value}")
    if value > hi:
        raise UsageError(f"{name} must be at most {hi}, got {value}")
    return value


def real(value, name: str, lo: float = 0.0, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] ((lo, hi] with ``lo_open``); −0.0 comes back as 0.0.

    NaN and ±inf are refused: every comparison with NaN is false, so an unchecked NaN passes any bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number, got {value!r}")
    value = float(value) + 0.0  # -0.0 + 0.0 is +0.0: a sign bit must never reach a bit-pattern comparison
    below = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or below or value > hi:
        if math.isfinite(hi):
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo == 0:
            span = "a finite, positive number" if lo_open else "a finite, non-negative number"
        else:
            span = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        raise UsageError(f"{name} must be {span}, got {value}")
    return value


def seed(value, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_SEED:
        raise UsageError(f"{name} must be a non-negative integer below 2**63, got {value!r}")
    return int(value)


def atol(value, name: str = "atol") -> float:
    """A tolerance: finite, non-negative, −0.0 normalised to 0.0 (its bit pattern is not a threshold of 0)."""
    return real(value, name)


def block_bytes(value, name: str = "block_bytes") -> int:
    return integer(value, name, 1, MAX_BLOCK_BYTES)


def mode(value, name: str = "comparison mode") -> str:
    """A comparison mode, one of :data:`COMPARE_MODES`."""
    if value not in COMPARE_MODES:
        raise UsageError(f"unknown {name} {value!r} (choose from {', '.join(COMPARE_MODES)})")
    return value
