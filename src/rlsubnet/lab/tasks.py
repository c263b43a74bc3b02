"""Synthetic tasks with exact answers, and their fixed train / validation / held-out splits.

Each task enumerates its whole problem space, so the splits are exact set partitions: a problem in the held-out
set is never in the training pool of any stage, whatever the run seed (``tests/lab`` checks it). The split
depends only on the task and ``SPLIT_SEED``, not on the run seed, so runs with different seeds are evaluated
on the same held-out problems.

- ``add``: "a+b=" → a + b, with 0 ≤ a, b ≤ 99 (10,000 problems; 2,000 held out).
- ``sub``: "a-b=" → a − b, with 0 ≤ b ≤ a ≤ 99 (5,050 problems; 1,010 held out). A different task over the same
  characters: the demo's second training set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from rlsubnet.errors import UsageError

SPLIT_SEED = 20250517  # fixed: the held-out set must not move with --seed
VALIDATION_SIZE = 500  # early stopping of pretraining looks here, never at the held-out set
MIN_HELDOUT = 1000


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    enumerate_problems: Callable[[], list[Problem]] = field(repr=False)
    heldout_fraction: float = 0.2

    @cached_property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(self.enumerate_problems())

    @cached_property
    def max_answer_chars(self) -> int:
        return max(len(p.answer) for p in self.problems)

    @cached_property
    def splits(self) -> dict[str, tuple[Problem, ...]]:
        """{"heldout", "validation", "train"}: a partition of :attr:`problems`, fixed by ``SPLIT_SEED``."""
        order = list(self.problems)
        random.Random(f"{SPLIT_SEED}:{self.name}").shuffle(order)
        n_heldout = max(MIN_HELDOUT, round(self.heldout_fraction * len(order)))
        if n_heldout + VALIDATION_SIZE >= len(order):
            raise ValueError(f"task {self.name}: too few problems ({len(order)}) for the splits")
        return {
            "heldout": tuple(order[:n_heldout]),
            "validation": tuple(order[n_heldout : n_heldout + VALIDATION_SIZE]),
            "train": tuple(order[n_heldout + VALIDATION_SIZE :]),
        }

    def split(self, name: str) -> tuple[Problem, ...]:
        return self.splits[name]

    def split_digest(self, name: str) -> str:
        """A short hash of a split's prompts, recorded with every result that depends on it."""
        h = hashlib.sha256("\n".join(p.prompt for p in self.split(name)).encode())
        return h.hexdigest()[:16]

    def answers(self) -> dict[str, str]:
        return {p.prompt: p.answer for p in self.problems}


def _addition() -> list[Problem]:
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(100)]


def _subtraction() -> list[Problem]:
    return [Problem(f"{a}-{b}=", str(a - b)) for a in range(100) for b in range(a + 1)]


TASKS: dict[str, Task] = {
    "add": Task("add", "2-digit addition: 'a+b=' -> a+b, 0 <= a, b <= 99", _addition),
    "sub": Task("sub", "2-digit subtraction: 'a-b=' -> a-b, 0 <= b <= a <= 99", _subtraction),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]


def ordered(problems: Sequence[Problem], n: int, seed: int) -> list[Problem]:
    """``n`` problems in a deterministic order: consecutive seeded shuffles of ``problems`` (epochs), cut at n.

    The data order of a stage is a pure function of (split, n, seed): a re-run with the same data seed sees
    the same problems in the same order, whatever else changes (the subnetwork re-runs rely on it).
    """
    if not problems:
        raise ValueError("no problems to order")
    rng = random.Random(f"order:{seed}")
    out: list[Problem] = []
    while len(out) < n:
        epoch = list(problems)
        rng.shuffle(epoch)
        out.extend(epoch[: n - len(out)])
    return out
