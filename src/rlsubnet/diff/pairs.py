"""Align the tensors of two checkpoints by name. Mismatches are never dropped silently."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rlsubnet.checkpoint.index import TensorInfo
from rlsubnet.errors import CheckpointError, MismatchError
from rlsubnet.errors import listing as _listing


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
    missing = [n for n in base if n not in tuned]
    extra = [n for n in tuned if n not in base]
    reshaped = [n for n in base if n in tuned and base[n].shape != tuned[n].shape]
    if (missing or extra or reshaped) and not allow_mismatch:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from {tuned_label}: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} only in {tuned_label}: {_listing(extra)}")
        if reshaped:
            parts.append(
                f"{len(reshaped)} with different shapes: "
                + _listing([f"{n} {list(base[n].shape)} vs {list(tuned[n].shape)}" for n in reshaped])
            )
        raise MismatchError(
            f"{base_label} and {tuned_label} hold different tensors ({'; '.join(parts)}); "
            "pass --allow-mismatch to compare the tensors both hold"
        )
    skipped = [Skipped(n, f"missing from {tuned_label}") for n in missing]
    skipped += [Skipped(n, f"only in {tuned_label}") for n in extra]
    skipped += [
        Skipped(n, f"shape {list(base[n].shape)} in {base_label} vs {list(tuned[n].shape)} in {tuned_label}")
        for n in reshaped
    ]
    bad = set(missing) | set(reshaped)
    names = [n for n in base if n not in bad]
    if not names and base:
        # Otherwise the run would "measure" 0 parameters and report them 100% sparse.
        raise MismatchError(f"{base_label} and {tuned_label} have no tensor in common (of the same shape): nothing to compare")
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
