"""Tied weights: tensors a model holds under several names, listed once.

Hugging Face models tie ``lm_head.weight`` to ``model.embed_tokens.weight`` and save it only under the first
name. Reading a live model, comparing it, patching it or masking its optimizer must therefore see each storage
once, under its first name, or a tied matrix is counted (or changed) twice and a saved checkpoint does not
match the live model name for name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

import torch


def storage_key(t: torch.Tensor) -> Hashable:
    """What makes two tensors the same weights: one storage, viewed at the same offset, shape and strides.
    Empty tensors are never the same: they own no storage to share (their data pointers may all be 0)."""
    if not t.numel():
        return ("empty", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))


def tied_groups(
    named: Iterable[tuple[str, torch.Tensor]], key: Callable[[torch.Tensor], Hashable] = storage_key
) -> dict[str, list[str]]:
    """First name → every name of the same tensor, in order; ``key`` says which are the same (the storage
    they view, or ``id`` for parameters, which a tied model shares as one object)."""
    first_of: dict[Hashable, str] = {}
    groups: dict[str, list[str]] = {}
    for name, t in named:
        first = first_of.setdefault(key(t), name)
        groups.setdefault(first, []).append(name)
    return groups


def unique_tensors(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict (or a mapping of tensors) with tied tensors kept once, under their first name, in
    order; entries that are not tensors are passed through for the caller to refuse or skip. The tensors are
    the state dict's: writing to them writes to the model."""
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    tensors = {n: t for n, t in sd.items() if isinstance(t, torch.Tensor)}
    firsts = set(tied_groups(tensors.items()))
    return {n: v for n, v in sd.items() if n in firsts or not isinstance(v, torch.Tensor)}
