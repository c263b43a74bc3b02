"""Apply patches: rebuild the target checkpoint from its base.

``apply_patches(base, [p1, p2, ...], out)`` checks everything it can before reading the base: each patch's
integrity (trailer → manifest → every record's sha256), the chain (each patch's base hash is the previous
patch's target hash), the base's tensor names, dtypes and shapes and the non-weight files it needs. Then it
streams, in one pass: each base tensor is read in blocks and hashed, every patch's changes for that block are
applied in chain order, and the result is hashed and written in the base's shard layout under a temporary
folder. A base tensor whose hash is not the one the patch expects, or an output tensor that is not the
target's, stops the run and removes the temporary folder; the output is renamed into place only when every
tensor checked out, so a wrong base never produces an output. (``verify_base_first=True`` hashes the whole
base in a first pass instead, before anything is written even under the temporary name: one more read.)
Memory: a few read blocks, each patch's record for the current tensor (compressed) and one decoded coding
block per patch.

Updating a loaded model in place instead (live weight sync): :func:`rlsubnet.patch.live.apply_patch_`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet._bits import NUMPY_UINT
from rlsubnet._threads import prefetch
from rlsubnet.checkpoint import SafetensorsWriter, element_size, open_checkpoint
from rlsubnet.checkpoint.hashing import TensorHasher, combine_hashes, hash_checkpoint, short
from rlsubnet.checkpoint.layout import write_index
from rlsubnet.checkpoint.stream import BLOCK_BYTES, BlockStream, Item, block_numel
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_dir, atomic_write_bytes, locks_output
from rlsubnet.patch.chain import (
    base_mismatch,
    check_base_layout,
    file_bytes,
    open_chain,
    output_layout,
    plan_chain,
    record_cursor,
    resolve_files,
)
from rlsubnet.patch.codec import RecordCursor, apply_changes
from rlsubnet.patch.errors import PatchError
from rlsubnet.patch.format import PatchFile
from rlsubnet.patch.signing import trusted_keys as as_trusted

THREADS_FROM_BYTES = 64 << 20  # below this many bytes of output, apply runs in one thread


@dataclass
class ApplySummary:
    out: Path
    target_hash: str
    tensors: int
    nbytes: int
    changed: int
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _read_step(chain: list[PatchFile], esize: int, read_bytes: int) -> int:
    """Elements per read: ``read_bytes`` worth, rounded down to whole coding blocks when the patches agree on
    their size and one fits (then every coding block is applied whole, without re-slicing its positions)."""
    sizes = {p.block_numel for p in chain}
    block = sizes.pop() if len(sizes) == 1 else 1
    return block_numel(read_bytes, esize, block if block * esize <= read_bytes else 1)


@locks_output("out")  # one writer per output, from the existence check to the rename
def apply_patches(
    base,
    patches,
    out: str | Path,
    *,
    overwrite: bool = False,
    verify_base_first: bool = False,
    include_files: bool = True,
    allow_pickle: bool = False,
    allow_download: bool = False,
    read_bytes: int = BLOCK_BYTES,
    direct_io: bool = True,
    progress: bool = False,
    trusted_keys=None,
) -> ApplySummary:
    """Rebuild the target of a chain of patches from ``base`` (None when the chain starts with an anchor).

    ``out`` is a folder (the base's shard layout and index, plus the target's non-weight files), or a
    ``.safetensors`` file when the output is a single shard. Nothing appears at ``out`` unless every tensor
    comes out with the target hash, and nothing appears there if the base is not the patch's: each base
    tensor's hash is checked as it streams, and the output, built under a temporary name, is removed on the
    first mismatch. ``verify_base_first=True`` hashes the whole base in a first pass instead, so a wrong base
    is refused before any output byte is written, even to the temporary name: one more read of the base.
    ``direct_io``: write the output with O_DIRECT where the file system allows it (no page-cache copy;
    the output is then not in the page cache afterwards); False writes through the page cache.
    ``trusted_keys``: public keys (paths, ``Ed25519PublicKey`` objects or raw 32-byte keys); when given, every
    patch of the chain must carry a valid signature by one of them, checked before anything is read from
    the base or written.
    """
    t0 = time.perf_counter()
    keys = as_trusted(trusted_keys)
    read_bytes = limits.block_bytes(read_bytes, "read_bytes")
    chain = open_chain(patches)
    if chain[0].kind == "delta" and base is None:
        raise UsageError(f"{chain[0].path} is a delta patch: give the base checkpoint it applies to")
    if chain[0].kind == "anchor" and base is not None:
        raise UsageError(f"{chain[0].path} is a full anchor: apply it without a base")
    for p in chain:
        p.check_signature(keys)
    for p in chain:
        p.verify()
    base_ck = None
    opened = False
    try:
        if base is not None:
            base_ck = open_checkpoint(base, allow_pickle=allow_pickle, allow_download=allow_download, label="base")
            opened = base_ck is not base
            check_base_layout(base_ck, chain[0])
        plans = plan_chain(chain, base_ck.names() if base_ck is not None else [])
        layout = output_layout(base_ck, plans)
        out = Path(out)
        single = out.suffix == ".safetensors"
        if not overwrite and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
            raise UsageError(f"{out}: exists (choose another output or pass --overwrite)")
        if single and len(layout.files) != 1:
            raise UsageError(
                f"{out}: the output has {len(layout.files)} shards; give a folder, not a .safetensors file"
            )
        files, file_data = None, []
        if include_files and not single:
            files = resolve_files(chain, layout.folder)
            file_data = [(name, file_bytes(name, src, sha)) for name, src, sha in files or []]
        if base_ck is not None and verify_base_first:
            got = hash_checkpoint(base_ck, threads=2)
            bad = [p.name for p in plans if p.in_base and got.tensors[p.name] != p.base_hash]
            if bad or got.digest != chain[0].base_hash:
                raise base_mismatch(base_ck, chain[0], bad, got.digest)

        def write_all(folder: Path | None) -> str:
            return _stream(
                chain,
                base_ck,
                plans,
                layout,
                folder,
                out,
                not verify_base_first,
                read_bytes,
                progress,
                direct_io,
                keys is not None,
            )

        if single:
            digest = write_all(None)
        else:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                digest = write_all(tmp)
                for name, data in file_data:
                    atomic_write_bytes(tmp / name, data)
    finally:
        if opened and base_ck is not None:
            base_ck.close()
    kept = [p for p in plans if p.dtype is not None]
    return ApplySummary(
        out,
        digest,
        len(kept),
        sum(_nbytes(p.dtype, p.shape) for p in kept if p.dtype is not None),
        sum(int(e["changed"]) for p in chain for e in p.tensors),
        [n for n, _, _ in files or []] if files else [],
        time.perf_counter() - t0,
    )


def _stream(
    chain, base_ck, plans, layout, folder, out, verify_streaming, read_bytes, progress, direct_io, recheck_records=False
) -> str:
    """Write every output tensor, shard by shard; returns the output's content hash (checked: the target's).

    Four threads share the work, each a few blocks ahead of the next: a reader reads (and, single pass,
    hashes) the base into recycled buffers; a decoder decompresses and decodes each patch's changes for the
    block; the calling thread applies them in chain order and hashes the result; a writer thread writes it
    (O_DIRECT when ``direct_io``) and hands the buffer back. Reads, hashing, numpy, zstd and disk writes
    release the GIL, so they overlap on as many cores as are free. ``recheck_records``: check each record's
    sha256 again as it is decoded (signed patches: what is decoded is then what the signature covered, even
    if the file changed after it was checked).
    """
    out_hashes: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(_nbytes(p.dtype, p.shape) for p in plans if p.dtype is not None)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="patch apply", delay=1.0, leave=False)

    # What to read: every output tensor, in the output's order, from the base (side 0) unless a patch stores it
    # whole; with verify_streaming, the base copy of each tensor the base holds is hashed, and at the end the
    # removed ones are read only to hash them (they are part of the base hash too).
    by_name = {p.name: p for p in plans}
    items = []
    for fname, specs in layout.files:
        for name, dtype, shape in specs:
            p = by_name[name]
            esize = element_size(dtype)
            items.append(
                Item(
                    name,
                    int(np.prod(shape, dtype=np.int64)),
                    _read_step(chain, esize, read_bytes),
                    read=(0,) if p.full_from is None else (),
                    hash=(0,) * (verify_streaming and p.in_base),
                    tag=(fname, p, esize),
                )
            )
    items += [
        Item(p.name, 0, 1, read=(), hash=(0,), tag=(None, p, 0))
        for p in plans
        if p.dtype is None and p.in_base and verify_streaming
    ]
    # Threads pay off on large checkpoints; on small ones (the demo's 2 MB models) handing tiny blocks between
    # four threads costs more than the work: then everything runs here, in order.
    threaded = sum(_nbytes(p.dtype, p.shape) for p in plans if p.dtype is not None) > THREADS_FROM_BYTES
    sizes = {element_size(p.dtype) for p in plans if p.dtype is not None}
    stream = BlockStream(
        [base_ck],
        items,
        depth=1 if threaded else 0,
        block_bytes=read_bytes,
        keep=8,
        buffer_bytes=max([_read_step(chain, e, read_bytes) * e for e in sizes], default=read_bytes),
    )
    pool = stream.pool

    def blocks():
        """Reader side: (file, plan, start, stop, buffer, words, base digest on the last block).

        ``words`` (unsigned integers viewing ``buffer``, a pooled buffer the writer gives back) hold the base's
        bits, or nothing yet when the tensor's starting bits come from a patch storing it whole.
        """
        with stream as read:
            for block in read:
                fname, p, esize = block.item.tag
                if fname is None:  # a removed tensor, read only to check its hash
                    if block.digests[0] != p.base_hash:
                        raise base_mismatch(base_ck, chain[0], [p.name], None)
                    continue
                if block.raw:
                    buf, w = block.buffers[0], block.words()[0]
                else:
                    nbytes = (block.stop - block.start) * esize
                    buf = pool.get(nbytes)
                    w = buf[:nbytes].view(NUMPY_UINT[esize])
                yield fname, p, block.start, block.stop, buf, w, block.digests.get(0)

    def decoded(items: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        """Decoder thread: the changes of each block, from every patch that touches the tensor, in chain order."""
        source: RecordCursor | None = None
        cursors: list[tuple[RecordCursor, str]] = []
        for fname, p, start, stop, buf, words, base_digest in items:
            if start == 0:  # a new tensor; every record was verified by apply_patches
                esize = element_size(p.dtype)
                check = recheck_records
                source = (
                    record_cursor(chain[p.full_from], p.name, esize, check=check) if p.full_from is not None else None
                )
                cursors = [(record_cursor(chain[i], p.name, esize, check=check), chain[i].values) for i in p.deltas]
            changes = [(source.changes(start, stop), "set")] if source is not None else []
            changes += [(cur.changes(start, stop), cur.mode(coding)) for cur, coding in cursors]
            yield fname, p, start, stop, buf, words, base_digest, changes

    specs_of = dict(layout.files)
    writers: list[SafetensorsWriter] = []
    current_file = None
    weight_map, total = {}, 0
    hasher: TensorHasher | None = None
    sink = _Sink() if threaded else _InlineSink()

    def write_block(writer: SafetensorsWriter, buf: np.ndarray, nbytes: int) -> None:
        writer.write_part(buf[:nbytes])
        pool.give(buf)

    try:
        # reader (the stream's thread) -> decoder -> this thread -> writer
        stages = prefetch(decoded(blocks()), depth=2) if threaded else decoded(blocks())
        for fname, p, start, stop, buf, words, base_digest, changes in stages:
            numel = int(np.prod(p.shape, dtype=np.int64))
            esize = element_size(p.dtype)
            if current_file != fname:
                if writers:
                    sink.submit(writers[-1].close)
                current_file = fname
                path = out if folder is None else folder / fname
                writers.append(
                    # O_DIRECT's staging buffer is not worth it for small outputs
                    SafetensorsWriter(
                        path, specs_of[fname], layout.file_metadata.get(fname), direct=direct_io and threaded
                    )
                )
                for n, d, sh in specs_of[fname]:
                    weight_map[n] = fname
                    total += _nbytes(d, sh)
            writer = writers[-1]
            if start == 0:
                hasher = TensorHasher(p.name, p.dtype, p.shape)
            for ch, mode in changes:
                apply_changes(words, ch, mode)
            if hasher is None:  # blocks of a tensor come in order from its start
                raise PatchError(f"tensor {p.name!r}: a block before the tensor's first (internal error)")
            hasher.update(words)
            sink.submit(write_block, writer, buf, words.nbytes)
            if bar is not None:
                bar.update(words.nbytes)
            if stop >= numel:
                if base_digest is not None and base_digest != p.base_hash:
                    raise base_mismatch(base_ck, chain[0], [p.name], None)
                sink.submit(writer.end_tensor, p.name)
                digest = hasher.hexdigest()
                if digest != p.target_hash:
                    raise PatchError(
                        f"tensor {p.name!r} came out with hash {short(digest)}, not the target's "
                        f"{short(p.target_hash)} (damaged patch or internal error); nothing written"
                    )
                out_hashes[p.name] = digest
        digest = combine_hashes(out_hashes)
        if digest != chain[-1].target_hash:  # implied by the per-tensor checks; a last guard before the rename
            raise PatchError(
                f"output hash {short(digest)} is not the target {short(chain[-1].target_hash)} (internal error)"
            )
        if writers:
            sink.submit(writers[-1].close)
        sink.finish()
        if folder is not None and len(layout.files) > 1:
            write_index(folder, weight_map, total, layout.index_metadata)
    except BaseException:
        sink.stop()
        for w in writers:
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return digest


class _Sink:
    """Run submitted calls in order on one background thread (disk writes, which release the GIL).

    An error in a call is re-raised by the next :meth:`submit` or by :meth:`finish`.
    """

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="rlsubnet-writer")
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    item[0](*item[1:])
                except BaseException as exc:  # handed to the submitting thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn, *args) -> None:
        self._check()
        self._q.put((fn, *args))

    def finish(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._check()

    def stop(self) -> None:
        """Drop what is queued and wait for the thread (after an error elsewhere)."""
        self._error = self._error or RuntimeError("stopped")
        while self._thread.is_alive():
            try:
                self._q.put(None, timeout=0.05)
            except Exception:
                pass
            self._thread.join(timeout=0.05)


class _InlineSink:
    """:class:`_Sink`'s interface, running each call at once in the calling thread."""

    def submit(self, fn, *args) -> None:
        fn(*args)

    def finish(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _nbytes(dtype: torch.dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * element_size(dtype)
