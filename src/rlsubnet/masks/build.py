"""Build a mask from a base and a tuned checkpoint, streaming.

The changed-test is the compare engine's, bit for bit (:class:`rlsubnet.diff.changed.ChangedTest`): Δ = tuned −
base in the comparison dtype of the mode, and an entry is unchanged when |Δ| ≤ atol rounded to Δ's dtype (NaN
counts as changed, as in ``torch.isclose``). So a mask's density always equals
``rlsubnet.compare(base, tuned, atol=atol, mode=mode).density(atol)``.

Tensors are read in the base's storage order in flat blocks of ``block_bytes`` per side, by a background thread
that also hashes the bytes it read (:mod:`rlsubnet.checkpoint.stream`); peak memory is a few blocks plus the
packed masks (1 bit per parameter).

Checkpoint record (stored in the mask for both sides): the source as given, format, tensor count, numel,
bytes, dtypes, ``layout_sha256`` (SHA-256 over the sorted ``name, dtype, shape`` lines: cheap, from headers) and
``content_hash``: the project's checkpoint hash (:mod:`rlsubnet.checkpoint.hashing`, scheme recorded as
``content_hash_scheme``) over the tensors in the mask, computed from the blocks the build reads anyway (``None``
with ``hash_content=False``). Both are independent of sharding and storage order, and ``content_hash`` equals
``hash_checkpoint(ck).digest`` when the mask covers every tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet._threads import map_pieces, single_threaded_torch
from rlsubnet.checkpoint import Checkpoint, dtype_name, element_size, open_checkpoint
from rlsubnet.checkpoint.align import align, require_parameters
from rlsubnet.checkpoint.hashing import HASH_SCHEME, combine_hashes
from rlsubnet.checkpoint.stream import BLOCK_BYTES, BlockStream, Item, block_numel
from rlsubnet.diff.changed import ChangedTest, atol_threshold, legacy_mode
from rlsubnet.errors import UsageError
from rlsubnet.masks.io import packed_size
from rlsubnet.masks.mask import Mask

SUB_BLOCK = 1 << 18  # entries per parallel piece (a multiple of 8: each piece packs into whole bytes)


def pack_changed(test: ChangedTest, base: torch.Tensor, tuned: torch.Tensor, out: np.ndarray) -> None:
    """Write the packed changed-bits (at the test's first atol) of flat blocks ``base``/``tuned`` into ``out``
    (len = ceil(n / 8)).

    Pieces of :data:`SUB_BLOCK` entries run on a small thread pool (numpy and torch release the GIL), with
    torch single-threaded so its own threads do not fight the pool."""
    n = base.numel()

    def work(start: int) -> None:
        stop = min(n, start + SUB_BLOCK)
        flags = test.changed(base[start:stop], tuned[start:stop])[0]
        out[start // 8 : packed_size(stop)] = np.packbits(flags, bitorder="big")

    with single_threaded_torch():
        map_pieces(work, n, SUB_BLOCK)


def layout_sha256(infos: Mapping) -> str:
    h = hashlib.sha256()
    for name in sorted(infos):
        i = infos[name]
        h.update(f"{name}\t{dtype_name(i.dtype)}\t{list(i.shape)}\n".encode())
    return h.hexdigest()


def checkpoint_record(ck: Checkpoint, content: Mapping[str, str] | None = None) -> dict:
    """What a mask records about a checkpoint it was built from (see the module docstring); ``content`` maps
    tensor name -> content hash (:mod:`rlsubnet.checkpoint.hashing`; its scheme is recorded next to it as
    ``content_hash_scheme``)."""
    dtypes: dict[str, int] = {}
    for i in ck.infos.values():
        dtypes[dtype_name(i.dtype)] = dtypes.get(dtype_name(i.dtype), 0) + 1
    rec = {
        "source": str(ck.source),
        "format": ck.format,
        "n_tensors": len(ck.infos),
        "numel": ck.numel,
        "nbytes": ck.nbytes,
        "dtypes": dict(sorted(dtypes.items())),
        "layout_sha256": layout_sha256(ck.infos),
        "content_hash": None,
    }
    if content is not None:
        rec["content_hash"] = combine_hashes(content)
        rec["content_hash_scheme"] = HASH_SCHEME
        rec["content_scope"] = "tensors in the mask" if len(content) != len(ck.infos) else "all tensors"
    return rec


def build_mask(
    base,
    tuned,
    *,
    atol: float = 1e-5,
    mode: str = "bf16",
    allow_mismatch: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
    hash_content: bool = True,
    progress: bool = False,
    block_bytes: int = BLOCK_BYTES,
    **legacy,
) -> Mask:
    """The mask of entries that changed between ``base`` and ``tuned`` at ``atol`` (|Δ| > atol in the
    comparison dtype of ``mode``).

    ``base`` and ``tuned`` are anything :func:`rlsubnet.open_checkpoint` opens (folder, file, hub id in the cache,
    state dict, module). Tensors the two do not share are an error unless ``allow_mismatch``; then they are left
    out of the mask and listed in ``meta["extra"]["skipped"]``.
    """
    mode = legacy_mode(mode, legacy)
    if isinstance(atol, (list, tuple)):
        if len(atol) != 1:
            raise UsageError(f"a mask is built at one atol, got {list(atol)}")
        atol = atol[0]
    atol = limits.atol(atol)
    block_bytes = limits.block_bytes(block_bytes)
    opts = {"allow_pickle": allow_pickle, "allow_download": allow_download}
    opened: list[Checkpoint] = []
    try:
        base_ck = open_checkpoint(base, **opts, label="base")
        opened.append(base_ck)
        tuned_ck = open_checkpoint(tuned, **opts, label="tuned")
        opened.append(tuned_ck)
        names, skipped = align(
            base_ck.infos,
            tuned_ck.infos,
            allow_mismatch=allow_mismatch,
            base_label=base_ck.location,
            tuned_label=tuned_ck.location,
        )
        if not names and base_ck.infos and tuned_ck.infos:
            raise UsageError(f"{base_ck.location} and {tuned_ck.location} share no tensors: nothing to mask")
        require_parameters(
            base_ck.infos,
            tuned_ck.infos,
            names,
            base_label=base_ck.location,
            tuned_label=tuned_ck.location,
            what="mask",
        )
        shapes = {n: base_ck.infos[n].shape for n in names}
        packed = {n: np.empty(packed_size(base_ck.infos[n].numel), dtype=np.uint8) for n in names}
        items = []
        for name in names:
            bi, ti = base_ck.infos[name], tuned_ck.infos[name]
            # a multiple of 8 entries per block, so the packed bytes of consecutive blocks concatenate
            step = block_numel(block_bytes, max(element_size(bi.dtype), element_size(ti.dtype)), 8)
            items.append(Item(name, bi.numel, step, read=(0, 1), hash=(0, 1) if hash_content else ()))
        hashes: tuple[dict, dict] = ({}, {})
        cmp_dtypes: dict[str, int] = {}
        test: ChangedTest | None = None
        stream = BlockStream([base_ck, tuned_ck], items, progress="mask" if progress else None)
        with stream as blocks:
            for block in blocks:
                name = block.item.name
                if block.start == 0 and block.item.numel:  # zero-size tensors have no comparison dtype to count
                    bi, ti = base_ck.infos[name], tuned_ck.infos[name]
                    test = ChangedTest(bi.dtype, ti.dtype, atol, mode)
                    key = dtype_name(test.cmp_dtype)
                    cmp_dtypes[key] = cmp_dtypes.get(key, 0) + 1
                if block.stop > block.start:
                    if test is None:  # a non-empty tensor's blocks start at 0, which sets its test
                        raise RuntimeError(f"{name}: block [{block.start}, {block.stop}) before the tensor's first")
                    b, t = block.tensors()
                    pack_changed(test, b, t, packed[name][block.start // 8 : packed_size(block.stop)])
                    del b, t
                stream.release(block)
                if block.last and hash_content:
                    hashes[0][name], hashes[1][name] = block.digests[0], block.digests[1]
        meta = {
            "kind": "changed",
            "atol": atol,
            "dtype": mode,
            "base": checkpoint_record(base_ck, hashes[0] if hash_content else None),
            "tuned": checkpoint_record(tuned_ck, hashes[1] if hash_content else None),
            "extra": {
                "compare_dtypes": cmp_dtypes,  # effective dtype Δ was computed in -> number of tensors
                "atol_effective": {
                    k: atol_threshold(atol, getattr(torch, k))
                    for k in cmp_dtypes
                    if getattr(torch, k).is_floating_point
                },
                "skipped": [s.to_record() for s in skipped],
                "definition": "changed iff not torch.isclose(tuned - base, 0, atol=atol, rtol=0) in the comparison dtype",
            },
        }
        return Mask(shapes, packed, meta)
    finally:
        for ck in opened:
            if ck is not base and ck is not tuned:
                ck.close()


def build_masks(base, tuned: Iterable, **kw) -> list[Mask]:
    """One mask per tuned checkpoint against the same base (convenience; each pair is streamed separately)."""
    return [build_mask(base, t, **kw) for t in tuned]


def describe_checkpoint(rec: Mapping | None) -> str:
    """One line for tables from a :func:`checkpoint_record`: source, numel and the first hex digits of the hashes."""
    if not rec:
        return "-"
    content = rec.get("content_hash")
    return (
        f"{rec.get('source')} ({rec.get('numel', 0):,} params, layout {rec.get('layout_sha256', '')[:12]}, "
        f"content {content[:12] if content else 'not hashed'})"
    )


def identity(
    full,
    other,
    *,
    atols=(0.0, 1e-5, 1e-4),
    inside: Mask | None = None,
    mode: str = "bf16",
    **kw,
) -> list[dict]:
    """Identity of two trained models: the share of entries with |θ_full − θ_other| ≤ atol,
    per atol, overall and (with ``inside``) among the entries of a mask, e.g. the subnetwork that was trained.

    Same test as everywhere (|Δ| ≤ atol in the comparison dtype), so identity at atol = sparsity of the pair.
    Returns [{"atol", "numel", "identical", "identity", "mask_numel", "identical_in_mask", "identity_in_mask"}].
    """
    out = []
    for atol in atols:
        differs = build_mask(full, other, atol=atol, mode=mode, hash_content=False, **kw)
        rec: dict[str, Any] = {
            "atol": limits.atol(atol),
            "numel": differs.numel,
            "identical": differs.numel - differs.changed,
            "identity": 1.0 - differs.density,
        }
        if inside is not None:
            n_in = inside.changed
            diff_in = differs.intersection_count(inside)
            rec.update(
                {
                    "mask_numel": n_in,
                    "identical_in_mask": n_in - diff_in,
                    "identity_in_mask": (n_in - diff_in) / n_in if n_in else None,
                }
            )
        out.append(rec)
    return out
