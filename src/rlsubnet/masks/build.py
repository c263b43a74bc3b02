"""Build a mask from a base and a tuned checkpoint, streaming.

The changed-test is the compare engine's, bit for bit: Δ = tuned − base in the comparison dtype
(:func:`rlsubnet.diff.stats.comparison_dtype`), and an entry is unchanged when |Δ| ≤ atol rounded to Δ's dtype
(:func:`rlsubnet.diff.stats.atol_threshold`), tested on the bit patterns exactly as
:class:`rlsubnet.diff.stats.DeltaAccumulator` counts it (NaN counts as changed, as in ``torch.isclose``). So a
mask's density always equals ``rlsubnet.compare(base, tuned, atol=atol, dtype=dtype).density(atol)``.

Tensors are read in the base's storage order in flat blocks of ``block_bytes`` per side, by a background thread
that also hashes the bytes it read; peak memory is a few blocks plus the packed masks (1 bit per parameter).

Checkpoint identity (recorded in the mask for both sides): the source as given, format, tensor count, numel,
bytes, dtypes, ``layout_sha256`` (SHA-256 over the sorted ``name, dtype, shape`` lines: cheap, from headers) and
``content_hash``: the project's checkpoint hash (:mod:`rlsubnet.checkpoint.hashing`, scheme recorded as
``content_hash_scheme``) over the tensors in the mask, computed from the blocks the build reads anyway (``None``
with ``hash_content=False``). Both are independent of sharding and storage order, and ``content_hash`` equals
``hash_checkpoint(ck).digest`` when the mask covers every tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from rlsubnet.checkpoint import Checkpoint, dtype_name, element_size, open_checkpoint
from rlsubnet.checkpoint.hashing import HASH_SCHEME, TensorHasher, combine_hashes
from rlsubnet.diff.pairs import align, require_parameters
from rlsubnet.diff.stats import ABS_MASK, INT_VIEW, COMPARE_DTYPES, atol_threshold, comparison_dtype, single_threaded_torch, threshold_bits, worker_pool
from rlsubnet import limits
from rlsubnet._threads import prefetch
from rlsubnet.errors import UsageError
from rlsubnet.masks.mask import Mask, packed_size

DEFAULT_BLOCK_BYTES = 16 << 20


SUB_BLOCK = 1 << 18  # entries per parallel piece (a multiple of 8: each piece packs into whole bytes)


class ChangedTest:
    """The compare engine's changed-test for one tensor pair, on flat blocks: True where |Δ| > atol."""

    def __init__(self, base_dtype: torch.dtype, tuned_dtype: torch.dtype, atol: float, dtype: str = "bf16"):
        self.cmp = comparison_dtype(dtype, base_dtype, tuned_dtype)
        self.is_float = self.cmp.is_floating_point
        if self.is_float:
            size = self.cmp.itemsize
            self._int = INT_VIEW[size]
            self._abs_mask = ABS_MASK[size]
            self._thr_bits = threshold_bits(atol, self.cmp)

    def __call__(self, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        b = base.reshape(-1).to(self.cmp)
        t = tuned.reshape(-1).to(self.cmp)
        if not self.is_float:
            return b != t
        bits = torch.sub(t, b).view(self._int).numpy()
        # |Δ| > thr on the sign-cleared bit pattern; NaN patterns sort above every threshold (changed).
        return torch.from_numpy(np.greater(np.bitwise_and(bits, self._abs_mask), self._thr_bits))

    def pack_into(self, base: torch.Tensor, tuned: torch.Tensor, out: np.ndarray) -> None:
        """Write the packed changed-bits of flat blocks ``base``/``tuned`` into ``out`` (len = ceil(n / 8)).

        Pieces of :data:`SUB_BLOCK` entries run on a small thread pool (numpy and torch release the GIL), with
        torch single-threaded so its own threads do not fight the pool."""
        base, tuned = base.reshape(-1), tuned.reshape(-1)
        n = base.numel()

        def work(start: int) -> None:
            stop = min(n, start + SUB_BLOCK)
            flags = self(base[start:stop], tuned[start:stop]).numpy()
            out[start // 8 : packed_size(stop)] = np.packbits(flags, bitorder="big")

        starts = range(0, n, SUB_BLOCK)
        with single_threaded_torch():
            if len(starts) > 1:
                list(worker_pool().map(work, starts))
            elif n:
                work(0)


def changed_mask_tensor(base: torch.Tensor, tuned: torch.Tensor, atol: float = 1e-5, dtype: str = "bf16") -> torch.Tensor:
    """Boolean tensor of the entries that changed (in-memory convenience; same test as :func:`build_mask`)."""
    if base.shape != tuned.shape:
        raise UsageError(f"shapes differ: {list(base.shape)} vs {list(tuned.shape)}")
    return ChangedTest(base.dtype, tuned.dtype, atol, dtype)(base, tuned).reshape(base.shape)


def layout_sha256(infos: Mapping) -> str:
    h = hashlib.sha256()
    for name in sorted(infos):
        i = infos[name]
        h.update(f"{name}\t{dtype_name(i.dtype)}\t{list(i.shape)}\n".encode())
    return h.hexdigest()


def checkpoint_identity(ck: Checkpoint, content: Mapping[str, str] | None = None) -> dict:
    """A cheap identity of a checkpoint (see the module docstring); ``content`` maps tensor name -> content
    hash (:mod:`rlsubnet.checkpoint.hashing`; its scheme is recorded next to it as ``content_hash_scheme``)."""
    dtypes: dict[str, int] = {}
    for i in ck.infos.values():
        dtypes[dtype_name(i.dtype)] = dtypes.get(dtype_name(i.dtype), 0) + 1
    ident = {
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
        ident["content_hash"] = combine_hashes(content)
        ident["content_hash_scheme"] = HASH_SCHEME
        ident["content_scope"] = "tensors in the mask" if len(content) != len(ck.infos) else "all tensors"
    return ident


def _block_numel(block_bytes: int, esize: int) -> int:
    # A multiple of 8 so the packed bytes of consecutive blocks concatenate.
    return max(8, (block_bytes // esize) // 8 * 8)


def build_mask(
    base,
    tuned,
    *,
    atol: float = 1e-5,
    dtype: str = "bf16",
    allow_mismatch: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
    hash_content: bool = True,
    progress: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Mask:
    """The mask of entries that changed between ``base`` and ``tuned`` at ``atol`` (|Δ| > atol in ``dtype``).

    ``base`` and ``tuned`` are anything :func:`rlsubnet.open_checkpoint` opens (folder, file, hub id in the cache,
    state dict, module). Tensors the two do not share are an error unless ``allow_mismatch``; then they are left
    out of the mask and listed in ``meta["extra"]["skipped"]``.
    """
    if dtype not in COMPARE_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r} (choose from {', '.join(COMPARE_DTYPES)})")
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
            base_ck.infos, tuned_ck.infos, allow_mismatch=allow_mismatch,
            base_label=base_ck.location, tuned_label=tuned_ck.location,
        )
        if not names and base_ck.infos and tuned_ck.infos:
            raise UsageError(f"{base_ck.location} and {tuned_ck.location} share no tensors: nothing to mask")
        require_parameters(base_ck.infos, tuned_ck.infos, names, base_label=base_ck.location,
                           tuned_label=tuned_ck.location, what="mask")
        shapes = {n: base_ck.infos[n].shape for n in names}
        packed = {n: np.empty(packed_size(base_ck.infos[n].numel), dtype=np.uint8) for n in names}
        hashes: tuple[dict, dict] = ({}, {})
        cmp_dtypes: dict[str, int] = {}

        def blocks():
            for name in names:
                bi, ti = base_ck.infos[name], tuned_ck.infos[name]
                block = _block_numel(block_bytes, max(element_size(bi.dtype), element_size(ti.dtype)))
                hb = TensorHasher(name, bi.dtype, bi.shape) if hash_content else None
                ht = TensorHasher(name, ti.dtype, ti.shape) if hash_content else None
                for start in range(0, bi.numel, block):
                    stop = min(bi.numel, start + block)
                    b = base_ck.read_flat(name, start, stop)
                    t = tuned_ck.read_flat(name, start, stop)
                    if hash_content:  # hashlib releases the GIL: hashing overlaps the main thread's work
                        hb.update(b)
                        ht.update(t)
                    yield name, start, b, t
                if hash_content:
                    hashes[0][name], hashes[1][name] = hb.hexdigest(), ht.hexdigest()

        bar = None
        if progress:
            from tqdm import tqdm

            total = sum(base_ck.infos[n].nbytes + tuned_ck.infos[n].nbytes for n in names)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="mask", delay=1.0, leave=False)
        tests: dict[str, ChangedTest] = {}
        try:
            for name, start, b, t in prefetch(blocks(), depth=1):
                test = tests.get(name)
                if test is None:
                    bi, ti = base_ck.infos[name], tuned_ck.infos[name]
                    test = tests[name] = ChangedTest(bi.dtype, ti.dtype, atol, dtype)
                    key = dtype_name(test.cmp)
                    cmp_dtypes[key] = cmp_dtypes.get(key, 0) + 1
                test.pack_into(b, t, packed[name][start // 8 : packed_size(start + b.numel())])
                if bar is not None:
                    bar.update(b.numel() * b.element_size() + t.numel() * t.element_size())
                if start + b.numel() == base_ck.infos[name].numel:
                    del tests[name]
        finally:
            if bar is not None:
                bar.close()
        for name in names:  # zero-size tensors are never visited above; their packed array is empty anyway
            if base_ck.infos[name].numel == 0:
                packed[name] = np.empty(0, dtype=np.uint8)
        meta = {
            "kind": "changed",
            "atol": atol,
            "dtype": dtype,
            "base": checkpoint_identity(base_ck, hashes[0] if hash_content else None),
            "tuned": checkpoint_identity(tuned_ck, hashes[1] if hash_content else None),
            "extra": {
                "compare_dtypes": cmp_dtypes,  # effective dtype Δ was computed in -> number of tensors
                "atol_effective": {k: atol_threshold(atol, getattr(torch, k)) for k in cmp_dtypes if getattr(torch, k).is_floating_point},
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


def describe_identity(ident: Mapping | None) -> str:
    """One line for tables: source, numel and the first hex digits of the hashes."""
    if not ident:
        return "-"
    content = ident.get("content_hash")
    return (f"{ident.get('source')} ({ident.get('numel', 0):,} params, layout {ident.get('layout_sha256', '')[:12]}, "
            f"content {content[:12] if content else 'not hashed'})")



def identity(
    full,
    other,
    *,
    atols=(0.0, 1e-5, 1e-4),
    inside: Mask | None = None,
    dtype: str = "bf16",
    **kw,
) -> list[dict]:
    """Identity of two trained models: the share of entries with |θ_full − θ_other| ≤ atol,
    per atol, overall and (with ``inside``) among the entries of a mask, e.g. the subnetwork that was trained.

    Same test as everywhere (|Δ| ≤ atol in the comparison dtype), so identity at atol = sparsity of the pair.
    Returns [{"atol", "numel", "identical", "identity", "mask_numel", "identical_in_mask", "identity_in_mask"}].
    """
    out = []
    for atol in atols:
        differs = build_mask(full, other, atol=atol, dtype=dtype, hash_content=False, **kw)
        rec = {"atol": limits.atol(atol), "numel": differs.numel, "identical": differs.numel - differs.changed,
               "identity": 1.0 - differs.density}
        if inside is not None:
            n_in = inside.changed
            diff_in = differs.intersection_count(inside)
            rec.update({"mask_numel": n_in, "identical_in_mask": n_in - diff_in,
                        "identity_in_mask": (n_in - diff_in) / n_in if n_in else None})
        out.append(rec)
    return out
