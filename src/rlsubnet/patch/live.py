"""Apply a patch to a loaded model in place (live weight sync): checked before anything changes, undone if a
tensor does not come out right."""

from __future__ import annotations

from typing import Any, cast

import torch

from rlsubnet._bits import NUMPY_INT, TORCH_INT
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.hashing import hash_tensor, short
from rlsubnet.checkpoint.index import ST_DTYPES
from rlsubnet.checkpoint.tensors import unique_tensors
from rlsubnet.errors import UsageError, listing
from rlsubnet.patch.chain import record_cursor
from rlsubnet.patch.errors import PatchError, WrongBaseError
from rlsubnet.patch.format import PatchFile


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a patch of a live model covers: its state dict with tied weights listed once.

    Tied weights (``lm_head.weight`` sharing the embedding) appear once, under the first name, so a patch
    never changes one storage twice; the trainer and every receiver use this same function. Returns the
    state dict's detached tensors: writing to them writes to the model. Entries that are not tensors are left out.
    """
    return {n: t for n, t in unique_tensors(model).items() if isinstance(t, torch.Tensor)}


def apply_patch_(model, patch, *, verify: bool = True, trusted_keys=None) -> str:
    """Update a loaded model (or a dict of tensors) in place with one patch; returns the new content hash.

    The model's tensors (:func:`model_tensors`) must have the names, dtypes and shapes of the patch's base,
    and, with ``verify`` (the default), its content hash: a model that does not hold the base is refused
    before anything changes. Every record's hash is checked before the first write, and each changed tensor's
    hash after; if one does not match, every tensor already changed is restored. A full anchor needs no base.
    ``verify=False`` skips hashing the model (one pass over its bytes, at memory speed) when the caller tracks the
    hash itself. Tensors may live on any device; a patch cannot add, remove or re-shape tensors in place.
    ``trusted_keys``: as for :func:`rlsubnet.patch.apply.apply_patches`; the signature is checked before anything changes.
    """
    p = patch if isinstance(patch, PatchFile) else PatchFile.open(patch)
    p.check_signature(trusted_keys)
    tensors = model_tensors(model)
    entries = p.entries()
    bad_ops = [n for n, e in entries.items() if e["op"] == "remove" or (e["op"] == "full" and p.kind == "delta")]
    if bad_ops:
        raise UsageError(
            f"{p.path}: adds, removes or re-shapes tensors ({listing(bad_ops)}); apply it to a checkpoint folder instead"
        )

    # layout_diff hands back the values it was given: manifest entries first, the model's tensors second
    def same(e: object, t: object) -> bool:
        entry, tensor = cast(dict[str, Any], e), cast(torch.Tensor, t)
        return ST_DTYPES.get(entry["dtype"]) == tensor.dtype and entry["shape"] == list(tensor.shape)

    def detail(n: str, e: object, t: object) -> str:
        entry, tensor = cast(dict[str, Any], e), cast(torch.Tensor, t)
        return f"{n} ({str(tensor.dtype)[6:]}{list(tensor.shape)}, patch has {entry['dtype']}{entry['shape']})"

    diff = layout_diff(entries, tensors, same=same, detail=detail)
    if diff:
        raise WrongBaseError(
            f"the model does not have the tensors {p.path} was made for "
            f"({diff.describe('missing', 'not in the patch', 'with another dtype or shape')}); nothing changed"
        )
    if p.kind == "delta" and verify:
        bad = [n for n, e in entries.items() if hash_tensor(n, tensors[n]) != e["base_hash"]]
        if bad:
            raise WrongBaseError(
                f"the model does not hold the base of {p.path} (expected {short(p.base_hash)}): {len(bad)} tensor(s) "
                f"differ ({listing(bad)}); nothing changed"
            )
    p.verify()

    undo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, e in entries.items():
                if e["op"] == "same":
                    continue
                t = tensors[name]
                if not t.is_contiguous():
                    raise UsageError(f"tensor {name!r} is not contiguous; cannot patch it in place")
                esize = t.element_size()
                flat = t.view(-1).view(TORCH_INT[esize])
                pos, vals = record_cursor(p, name, esize).take(0, t.numel())
                pos_t = torch.from_numpy(pos).to(t.device)
                vals_t = torch.from_numpy(vals.view(NUMPY_INT[esize])).to(t.device)
                undo.append((flat, pos_t, flat[pos_t].clone()))
                if e["op"] == "full":
                    flat.copy_(vals_t)
                elif p.values == "xor":
                    flat[pos_t] ^= vals_t
                else:
                    flat[pos_t] = vals_t
                if hash_tensor(name, t) != e["target_hash"]:
                    raise PatchError(f"{p.path}: tensor {name!r} did not come out with its target hash; model restored")
    except BaseException:
        with torch.no_grad():
            for flat, pos_t, old in reversed(undo):
                flat[pos_t] = old
        raise
    return p.target_hash
