"""Align the tensors of two checkpoints (or masks, or a model) by name. Mismatches are never dropped silently.

:func:`layout_diff` finds the names one side lacks, the other lacks, and those whose layout (shape, dtype)
differs; :meth:`LayoutDiff.describe` words them for the one-line error every caller raises.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from rlsubnet.checkpoint.index import TensorInfo
from rlsubnet.errors import CheckpointError, MismatchError, listing

L = TypeVar("L")  # a layout: a shape, a TensorInfo, a spec


@dataclass
class LayoutDiff:
    """How two name → layout mappings differ: names only in the first (``missing`` from the second), only in
    the second (``extra``), and in both with another layout (``differ``, with a ``details`` line each)."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.differ)

    def describe(self, missing: str, extra: str, differ: str = "with different shapes") -> str:
        """ "N <missing>: a, b; N <extra>: c; N <differ>: d [2] vs [3]", naming only the kinds that occur; the
        phrases say which side is which in the caller's terms."""
        parts = [
            f"{len(names)} {phrase}: {listing(names)}"
            for names, phrase in ((self.missing, missing), (self.extra, extra), (self.details, differ))
            if names
        ]
        return "; ".join(parts)


def layout_diff(
    first: Mapping[str, L],
    second: Mapping[str, L],
    *,
    same: Callable[[L, L], bool] = operator.eq,
    detail: Callable[[str, L, L], str] | None = None,
) -> LayoutDiff:
    """Compare two mappings of name → layout (shapes, infos, specs) in ``first``'s order; ``same`` decides
    whether two layouts agree, ``detail(name, a, b)`` words a disagreement (default: "name a vs b")."""
    detail = detail or (lambda name, a, b: f"{name} {a} vs {b}")
    diff = LayoutDiff([n for n in first if n not in second], [n for n in second if n not in first])
    for n, a in first.items():
        if n in second and not same(a, second[n]):
            diff.differ.append(n)
            diff.details.append(detail(n, a, second[n]))
    return diff


def _shape(info: TensorInfo) -> list[int]:
    return list(info.shape)


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of a comparison, and why (recorded in every output)."""

    name: str
    reason: str

    def to_record(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def align(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    *,
    allow_mismatch: bool = False,
    base_label: str = "base",
    tuned_label: str = "tuned",
) -> tuple[list[str], list[Skipped]]:
    """Names both checkpoints hold with the same shape, in the base's storage order, and the skipped ones.

    Without ``allow_mismatch`` any missing, extra or differently shaped tensor raises :class:`MismatchError`
    listing them all by kind.
    """
    diff = layout_diff(
        base, tuned, same=lambda a, b: a.shape == b.shape, detail=lambda n, a, b: f"{n} {_shape(a)} vs {_shape(b)}"
    )
    missing, extra, reshaped = diff.missing, diff.extra, diff.differ
    if diff and not allow_mismatch:
        raise MismatchError(
            f"{base_label} and {tuned_label} hold different tensors "
            f"({diff.describe(f'missing from {tuned_label}', f'only in {tuned_label}')}); "
            "pass --allow-mismatch to compare the tensors both hold"
        )
    skipped = [Skipped(n, f"missing from {tuned_label}") for n in missing]
    skipped += [Skipped(n, f"only in {tuned_label}") for n in extra]
    skipped += [
        Skipped(n, f"shape {_shape(base[n])} in {base_label} vs {_shape(tuned[n])} in {tuned_label}") for n in reshaped
    ]
    bad = set(missing) | set(reshaped)
    names = [n for n in base if n not in bad]
    if not names and base:
        # Otherwise the run would "measure" 0 parameters and report them 100% sparse.
        raise MismatchError(
            f"{base_label} and {tuned_label} have no tensor in common (of the same shape): nothing to compare"
        )
    return names, skipped


def require_parameters(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    names: list[str],
    *,
    base_label: str = "base",
    tuned_label: str = "tuned",
    what: str = "compare",
) -> None:
    """Refuse a comparison over zero parameters (no tensors, or only empty ones): it measures nothing, and
    0 changed of 0 would otherwise be reported as 100% sparsity."""
    if any(base[n].numel for n in names):
        return
    empty = list(dict.fromkeys(label for label, infos in ((base_label, base), (tuned_label, tuned)) if not infos))
    if empty:
        why = f"{' and '.join(empty)} {'hold' if len(empty) > 1 else 'holds'} no tensors"
    else:
        why = f"the {len(names)} tensor{'s' if len(names) != 1 else ''} both hold {'are' if len(names) != 1 else 'is'} empty (0 parameters)"
    raise CheckpointError(f"{base_label} vs {tuned_label}: nothing to {what}: {why}")
