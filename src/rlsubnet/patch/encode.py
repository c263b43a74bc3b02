"""Make a patch: the entries whose bits differ between a base and a target checkpoint, and their new values.

Tensors are visited in the base's storage order and read in blocks of about ``read_bytes`` per side by a
background thread (:mod:`rlsubnet.checkpoint.stream`), into recycled buffers, which also hashes them (XXH3,
memory speed); the main thread finds
the differing bits (an integer XOR in the stored dtype, so -0 vs +0 and NaN payloads count) and codes them
(codec.py), and a third thread runs zstd on the coded block while the main thread codes the next. One
tensor's compressed record is held in memory, then appended to the patch file. Memory: a few read blocks
plus one tensor's record.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import zstandard

from rlsubnet import limits
from rlsubnet._version import __version__
from rlsubnet.checkpoint import Checkpoint, element_size, open_checkpoint
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.hashing import HASH_SCHEME, combine_hashes, hash_checkpoint_tensor
from rlsubnet.checkpoint.index import TORCH_TO_ST, TensorInfo
from rlsubnet.checkpoint.layout import aux_files
from rlsubnet.checkpoint.stream import BLOCK_BYTES, BlockStream, Item, block_numel
from rlsubnet.errors import CheckpointError, MismatchError, UsageError, listing
from rlsubnet.fileio import locks_output
from rlsubnet.patch.codec import BLOCK_NUMEL, MAX_BLOCK_NUMEL, VALUE_CODINGS, TensorEncoder
from rlsubnet.patch.format import FORMAT_NAME, FORMAT_VERSION, PatchWriter
from rlsubnet.patch.live import model_tensors

DEFAULT_LEVEL = 1  # measured: smaller AND faster than 3-19 on position and XOR-value streams (docs/patches.md)
THREADS_FROM_BYTES = 64 << 20  # below this many bytes read, create runs in one thread
MAX_AUX_FILE_BYTES = 64 << 20
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# At level 1, XOR values are coded with a 256-entry match table instead of level 1's 16384: they are noisy
# low mantissa bits with few long matches, and the small table stays in L1 cache. Measured on 1 GiB bf16
# pairs: 1.9x faster and 3-5% smaller at 30% density (65.1 vs 68.5 MB), 0.2-0.8% smaller on the demo's RL
# pairs. Absolute values (and anchors) keep level 1's table: they came out 1.5-2.4% larger with it.
VALUES_HASH_LOG = 8


def compressors(level: int, values: str) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]:
    """(positions, values) zstd compressors for ``level`` and the value coding (see VALUES_HASH_LOG)."""
    if level == 1 and values == "xor":
        params = zstandard.ZstdCompressionParameters.from_level(level, hash_log=VALUES_HASH_LOG)
        return zstandard.ZstdCompressor(level=level), zstandard.ZstdCompressor(compression_params=params)
    return zstandard.ZstdCompressor(level=level), zstandard.ZstdCompressor(level=level)


@dataclass
class _Plan:
    name: str
    op: str  # "delta" (both hold it alike), "full" (new, or new dtype/shape), "remove" (base only)
    base: TensorInfo | None
    target: TensorInfo | None

    @property
    def info(self) -> TensorInfo:
        """The tensor as the target holds it, or as the base did for a removed one."""
        info = self.target or self.base
        if info is None:
            raise ValueError(f"{self.name}: a tensor plan with neither a base nor a target (internal error)")
        return info


@dataclass
class PatchSummary:
    """What :func:`create_patch` wrote: the file, its size and its manifest (see ``rlsubnet patch info``)."""

    path: Path
    nbytes: int
    manifest: dict
    seconds: float = 0.0
    target_hashes: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def changed(self) -> int:
        return self.manifest["totals"]["changed"]

    @property
    def target_nbytes(self) -> int:
        return self.manifest["target"]["nbytes"]


def _spec(info: object) -> str:
    info = cast(TensorInfo, info)  # layout_diff hands back the TensorInfos it was given
    return f"{str(info.dtype).removeprefix('torch.')}{list(info.shape)}"


def _same_layout(x: object, y: object) -> bool:
    a, b = cast(TensorInfo, x), cast(TensorInfo, y)  # layout_diff hands back the TensorInfos it was given
    return (a.shape, a.dtype) == (b.shape, b.dtype)


def plan_tensors(base: Checkpoint | None, target: Checkpoint, allow_mismatch: bool) -> list[_Plan]:
    """One plan per tensor: base storage order, then tensors only the target holds.

    Tensors missing from either side, or stored with another dtype or shape, are refused unless
    ``allow_mismatch``; then removed ones are listed and new or changed-layout ones stored whole.
    """
    if base is None:
        return [_Plan(n, "full", None, i) for n, i in target.infos.items()]
    b, t = base.infos, target.infos
    diff = layout_diff(b, t, same=_same_layout, detail=lambda n, x, y: f"{n} {_spec(x)} vs {_spec(y)}")
    extra, relaid = diff.extra, set(diff.differ)
    if diff and not allow_mismatch:
        raise MismatchError(
            f"{base.location} and {target.location} hold different tensors "
            f"({diff.describe('missing from the target', 'only in the target', 'with another dtype or shape')}); "
            "pass --allow-mismatch to record removed tensors and store new or re-shaped ones whole"
        )
    plans = []
    for n, bi in b.items():
        if n not in t:
            plans.append(_Plan(n, "remove", bi, None))
        elif n in relaid:
            plans.append(_Plan(n, "full", bi, t[n]))
        else:
            plans.append(_Plan(n, "delta", bi, t[n]))
    plans += [_Plan(n, "full", None, t[n]) for n in extra]
    return plans


def _items(plans: list[_Plan], coding_block: int, read_bytes: int, hash_base: bool, hash_target: bool) -> list[Item]:
    """What to stream for each plan, from checkpoints 0 (the base) and 1 (the target): the blocks the patch is
    made from, and the hashes of both sides (a base copy stored whole, or removed, is read only to hash it)."""
    items = []
    for plan in plans:
        hashed = (0,) * (hash_base and plan.base is not None) + (1,) * (hash_target and plan.target is not None)
        if plan.target is None:  # removed: nothing to code, one (empty) block to end the tensor on
            items.append(Item(plan.name, 0, 1, read=(), hash=hashed, tag=plan))
            continue
        read = (0, 1) if plan.op == "delta" else (1,)
        # whole coding blocks per read, so the encoder never splits one
        step = block_numel(read_bytes, element_size(plan.target.dtype), coding_block)
        items.append(Item(plan.name, plan.target.numel, step, read=read, hash=hashed, tag=plan))
    return items


def encode_checkpoints(
    writer: PatchWriter,
    base: Checkpoint | None,
    target: Checkpoint,
    *,
    values: str = "xor",
    level: int = DEFAULT_LEVEL,
    allow_mismatch: bool = False,
    block_numel: int = BLOCK_NUMEL,
    read_bytes: int = BLOCK_BYTES,
    base_hashes: dict[str, str] | None = None,
    hash_target_lazily: bool = False,
    progress: bool = False,
) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """Append every tensor's record to ``writer``; return (manifest entries, base hashes, target hashes).

    ``base_hashes``: trusted per-tensor hashes of ``base`` (e.g. the target hashes of the previous sync), so
    the base is not hashed again. ``hash_target_lazily``: hash a target tensor only when it differs from
    the base (cheap for in-memory checkpoints; files would be read twice).
    """
    if values not in VALUE_CODINGS:
        raise UsageError(f"unknown value coding {values!r} (choose from {', '.join(VALUE_CODINGS)})")
    if not 1 <= block_numel <= MAX_BLOCK_NUMEL:
        raise UsageError(f"block_numel must be in 1..{MAX_BLOCK_NUMEL}")
    level = limits.integer(level, "level", 1, 22)
    read_bytes = limits.block_bytes(read_bytes, "read_bytes")
    plans = plan_tensors(base, target, allow_mismatch)
    if base_hashes is not None:
        missing = [p.name for p in plans if p.base is not None and p.name not in base_hashes]
        if missing:
            raise ValueError(f"base_hashes lacks {listing(missing)}")
    hash_base = base_hashes is None
    lazy = hash_target_lazily and base_hashes is not None
    cctx = compressors(level, values if base is not None else "absolute")
    entries: list[dict] = []
    b_hashes: dict[str, str] = {}
    t_hashes: dict[str, str] = {}

    def end_tensor(plan: _Plan, digests: dict[int, str], encoder: TensorEncoder | None) -> dict:
        """The manifest entry of a tensor whose blocks are all coded, its record appended to ``writer``;
        ``digests``: the hashes streamed (0: the base's, 1: the target's)."""
        info = plan.info
        base_digest = base_hashes[plan.name] if plan.base is not None and base_hashes is not None else digests.get(0)
        entry: dict[str, Any] = {
            "name": plan.name,
            "op": plan.op,
            "dtype": TORCH_TO_ST[info.dtype],
            "shape": list(info.shape),
            "numel": info.numel,
            "changed": 0,
            "base_hash": base_digest,
            "target_hash": None,
            "record": None,
        }
        if plan.op == "full" and plan.base is not None:
            entry["base_dtype"] = TORCH_TO_ST[plan.base.dtype]
            entry["base_shape"] = list(plan.base.shape)
        if plan.target is not None:
            if encoder is None:  # an empty tensor: no blocks were coded
                encoder = TensorEncoder(
                    info.numel, element_size(info.dtype), cctx, block_numel, full=plan.op == "full", pool=zpool
                )
            pos, val = encoder.finish()
            entry["changed"] = encoder.changed
            if plan.op == "delta" and encoder.changed == 0:
                entry["op"] = "same"
            elif plan.op == "full" or encoder.changed:
                entry["record"] = writer.add_record(pos, val)
            target_digest = digests.get(1)
            if lazy:
                target_digest = base_digest if entry["op"] == "same" else hash_checkpoint_tensor(target, plan.name)
            if target_digest is None:  # the stream hashes every target tensor unless it is hashed lazily above
                raise ValueError(f"{plan.name}: no target hash (internal error)")
            entry["target_hash"] = t_hashes[plan.name] = target_digest
        if plan.base is not None:
            if base_digest is None:  # given in base_hashes, or else hashed by the stream
                raise ValueError(f"{plan.name}: no base hash (internal error)")
            b_hashes[plan.name] = base_digest
        return entry

    encoder: TensorEncoder | None = None
    # Threads pay off on large checkpoints; on small ones (the demo's 2 MB models) handing tiny blocks between
    # threads costs more than the work: then everything runs here, in order.
    threaded = sum((p.base.nbytes if p.base else 0) + (p.target.nbytes if p.target else 0) for p in plans) > (
        THREADS_FROM_BYTES
    )
    stream = BlockStream(
        [base, target],
        _items(plans, block_numel, read_bytes, hash_base, not lazy),
        depth=2 if threaded else 0,
        block_bytes=read_bytes,
        progress="patch create" if progress else None,
    )
    xor_buf = np.empty(stream.pool.nbytes, dtype=np.uint8)  # the consumer's scratch, reused for every block
    mask_buf = np.empty(stream.pool.nbytes, dtype=bool)
    zpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsubnet-zstd") if threaded else None
    try:
        with stream as blocks:
            for block in blocks:
                plan: _Plan = block.item.tag
                info = plan.info
                esize = element_size(info.dtype)
                if block.stop > block.start:
                    if encoder is None:
                        encoder = TensorEncoder(
                            info.numel, esize, cctx, block_numel, full=plan.op == "full", pool=zpool
                        )
                    words = block.words()  # (base, target) for a delta, (target,) for a tensor stored whole
                    t = words[-1]
                    if plan.op == "delta":
                        b = words[0]
                        if t.nbytes <= len(xor_buf):
                            x = np.bitwise_xor(b, t, out=xor_buf[: t.nbytes].view(t.dtype))
                            changed = np.not_equal(x, 0, out=mask_buf[: len(x)])
                        else:  # a coding block larger than the read size
                            x = b ^ t
                            changed = None
                        encoder.add_delta(block.start, x, t if values == "absolute" else None, changed)
                    else:
                        encoder.add_full(block.start, t)
                    del words, t
                stream.release(block)
                if not block.last:
                    continue
                entries.append(end_tensor(plan, block.digests, encoder))
                encoder = None
    finally:
        if zpool is not None:
            zpool.shutdown(wait=True, cancel_futures=True)
    return entries, b_hashes, t_hashes


def _summary_of(ck: Checkpoint, hashes: dict[str, str]) -> dict:
    return {
        "hash": combine_hashes(hashes),
        "source": str(ck.source),
        "tensors": len(ck.infos),
        "numel": ck.numel,
        "nbytes": ck.nbytes,
    }


def _files_section(writer: PatchWriter, base: Checkpoint | None, target: Checkpoint, level: int):
    """Non-weight files of the target folder: by reference when the base folder holds the same bytes."""
    folder = Path(target.location)
    if not folder.is_dir():
        return None, []
    base_folder = Path(base.location) if base is not None and Path(base.location).is_dir() else None
    own = {i.file.name for i in target.infos.values()} | set(INDEX_FILES)
    kept, skipped = aux_files(folder, MAX_AUX_FILE_BYTES, own)
    cctx = zstandard.ZstdCompressor(level=max(level, 9))
    files = []
    seen: dict[str, str] = {}
    for path in kept:
        if path.name.lower() in seen:  # readers refuse two entries one case-insensitive file system merges
            skipped.append((path.name, f"same name as {seen[path.name.lower()]} but for case"))
            continue
        seen[path.name.lower()] = path.name
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        entry = {"name": path.name, "nbytes": len(data), "sha256": digest}
        same = (
            base_folder is not None
            and (base_folder / path.name).is_file()
            and (
                (base_folder / path.name).stat().st_size == len(data)
                and hashlib.sha256((base_folder / path.name).read_bytes()).hexdigest() == digest
            )
        )
        if same:
            entry["source"] = "base"
        else:
            entry["source"] = "patch"
            entry["record"] = writer.add_record(cctx.compress(data))
        files.append(entry)
    return files, [{"name": n, "reason": r} for n, r in skipped]


def _totals(entries: list[dict]) -> dict:
    pos = sum(e["record"]["nbytes"][0] for e in entries if e["record"] is not None)
    val = sum(e["record"]["nbytes"][-1] for e in entries if e["record"] is not None)
    delta = [e for e in entries if e["op"] in ("same", "delta")]
    return {
        "numel": sum(e["numel"] for e in entries if e["op"] != "remove"),
        "changed": sum(e["changed"] for e in entries),
        "compared_numel": sum(e["numel"] for e in delta),
        "compared_changed": sum(e["changed"] for e in delta),
        "tensors_changed": sum(1 for e in entries if e["op"] == "delta"),
        "tensors_full": sum(1 for e in entries if e["op"] == "full"),
        "tensors_removed": sum(1 for e in entries if e["op"] == "remove"),
        "positions_nbytes": pos,
        "values_nbytes": val,
    }


@locks_output("out")
def write_patch(
    base: Checkpoint | None,
    target: Checkpoint,
    out: str | Path,
    *,
    values: str = "xor",
    level: int = DEFAULT_LEVEL,
    allow_mismatch: bool = False,
    include_files: bool = True,
    metadata: dict | None = None,
    overwrite: bool = False,
    block_numel: int = BLOCK_NUMEL,
    read_bytes: int = BLOCK_BYTES,
    base_hashes: dict[str, str] | None = None,
    hash_target_lazily: bool = False,
    progress: bool = False,
    sign_key=None,
) -> PatchSummary:
    """Write the patch from open checkpoints (``base`` None: a full anchor of ``target``).

    ``sign_key``: sign the patch with this Ed25519 private key (a key file path, an ``Ed25519PrivateKey`` or
    its 32 raw bytes; see :mod:`rlsubnet.patch.signing`).
    """
    t0 = time.perf_counter()
    level = limits.integer(level, "level", 1, 22)
    read_bytes = limits.block_bytes(read_bytes, "read_bytes")
    if not any(i.numel for i in target.infos.values()):
        # A patch rebuilding nothing is almost always the wrong folder; refuse it as compare and mask do.
        what = "no tensors" if not target.infos else f"only empty tensors ({len(target.infos)}, 0 parameters)"
        raise CheckpointError(f"{target.location}: holds {what}: nothing to patch")
    with PatchWriter(out, overwrite=overwrite, sign_key=sign_key) as writer:
        entries, b_hashes, t_hashes = encode_checkpoints(
            writer,
            base,
            target,
            values=values,
            level=level,
            allow_mismatch=allow_mismatch,
            block_numel=block_numel,
            read_bytes=read_bytes,
            base_hashes=base_hashes,
            hash_target_lazily=hash_target_lazily,
            progress=progress,
        )
        files, skipped = _files_section(writer, base, target, level) if include_files else (None, [])
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rlsubnet_version": __version__,
            "kind": "anchor" if base is None else "delta",
            "hash_scheme": HASH_SCHEME,
            "values": values if base is not None else "absolute",
            "block_numel": block_numel,
            "zstd_level": level,
            "zstd_values_hash_log": VALUES_HASH_LOG if level == 1 and base is not None and values == "xor" else None,
            "base": None if base is None else _summary_of(base, b_hashes),
            "target": _summary_of(target, t_hashes),
            "allow_mismatch": allow_mismatch,
            "totals": _totals(entries),
            "tensors": entries,
            "files": files,
            "skipped_files": skipped,
            "metadata": dict(metadata or {}),
        }
        nbytes = writer.finish(manifest)
    return PatchSummary(Path(out), nbytes, manifest, time.perf_counter() - t0, t_hashes)


@locks_output("out")
def create_patch(
    base, tuned, out: str | Path, *, allow_pickle: bool = False, allow_download: bool = False, **options
) -> PatchSummary:
    """Write a lossless patch that turns ``base`` into ``tuned``; ``base=None`` writes a full anchor.

    ``base``/``tuned``: a model folder, a .safetensors file, a hub id in the local cache, a state dict or a
    module. ``options`` are :func:`write_patch`'s: ``values="xor"`` (default) stores each changed entry as new
    bits XOR old bits (smallest when changes are small, as in RL), ``"absolute"`` the new bits themselves (both
    rebuild the target bit for bit); ``level`` (zstd), ``allow_mismatch``, ``include_files``, ``metadata``,
    ``overwrite``, ``progress``; ``sign_key``: an Ed25519 private key (file path, key object or 32 raw bytes)
    to sign the patch with.

    >>> rlsubnet.patch.create_patch("base/", "grpo/", "grpo.rlpatch").nbytes
    """
    opts = {"allow_pickle": allow_pickle, "allow_download": allow_download}
    limits.integer(options.get("level", DEFAULT_LEVEL), "level", 1, 22)  # before any checkpoint is opened
    if isinstance(base, torch.nn.Module) or isinstance(tuned, torch.nn.Module):
        # tied weights once, and no entries that are not tensors: what apply_patch_ will see
        base = model_tensors(base) if isinstance(base, torch.nn.Module) else base
        tuned = model_tensors(tuned) if isinstance(tuned, torch.nn.Module) else tuned
    opened = []
    try:
        base_ck = None
        if base is not None:
            base_ck = open_checkpoint(base, **opts, label="base")
            opened.append(base_ck)
        tuned_ck = open_checkpoint(tuned, **opts, label="tuned")
        opened.append(tuned_ck)
        return write_patch(base_ck, tuned_ck, out, **options)
    finally:
        for ck in opened:
            if ck is not base and ck is not tuned:
                ck.close()
