"""Apply patches: rebuild the target checkpoint from its base, or update a loaded model in place.

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

``apply_patch_(model, patch)`` updates the tensors of a loaded model (any device) in place for live weight
sync, after checking the model holds the patch's base; if a tensor does not come out with its target hash,
every tensor already changed is restored.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zstandard

from rlsubnet import limits
from rlsubnet.checkpoint import Checkpoint, SafetensorsWriter, element_size, open_checkpoint
from rlsubnet.checkpoint.hashing import TensorHasher, combine_hashes, hash_checkpoint, hash_tensor, short
from rlsubnet.checkpoint.index import ST_DTYPES
from rlsubnet.checkpoint.layout import Layout, aux_files, layout_of, write_index
from rlsubnet.checkpoint.writer import plan_shards, shard_file_names
from rlsubnet.errors import UsageError, listing
from rlsubnet.fileio import atomic_dir, atomic_write_bytes, locks_output
from rlsubnet._threads import prefetch
from rlsubnet.patch._buffers import Recycler
from rlsubnet.patch.codec import UINT_OF, RecordCursor, apply_changes
from rlsubnet.patch.errors import PatchError, WrongBaseError
from rlsubnet.patch.format import PatchFile, check_file_name
from rlsubnet.patch.signing import trusted_keys as as_trusted

DEFAULT_READ_BYTES = 16 << 20
THREADS_FROM_BYTES = 64 << 20  # below this many bytes of output, apply runs in one thread
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # for outputs with no base layout to follow (a chain starting at an anchor)
# Integer views for in-place bit writes (torch has no XOR on uint16/32/64 everywhere; signed is the same bits).
_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass
class ApplySummary:
    out: Path
    target_hash: str
    tensors: int
    nbytes: int
    changed: int
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------- chains
def open_chain(patches) -> list[PatchFile]:
    """Open patches (paths or PatchFile) and check they form a chain, in the order given."""
    chain = [p if isinstance(p, PatchFile) else PatchFile.open(p) for p in patches]
    if not chain:
        raise UsageError("give at least one patch")
    for i, p in enumerate(chain):
        if i and p.kind == "anchor":
            raise WrongBaseError(
                f"{p.path} is a full anchor: it can only start a chain (apply it, and the patches after it, "
                "without a base)"
            )
    for i in range(1, len(chain)):
        prev, cur = chain[i - 1], chain[i]
        if cur.base_hash != prev.target_hash:
            order = _chain_order(chain)
            hint = f"; wrong order? these chain as {', '.join(q.path.name for q in order)}" if order else ""
            raise WrongBaseError(
                f"{cur.path}: expects base {short(cur.base_hash)}, but {prev.path} produces {short(prev.target_hash)} "
                f"(patch {i + 1} does not follow patch {i}{hint}); nothing written"
            )
        prev_targets = {t["name"]: t["target_hash"] for t in prev.tensors if t["op"] != "remove"}
        cur_bases = {t["name"]: t["base_hash"] for t in cur.tensors if t.get("base_hash")}
        if prev_targets != cur_bases:
            raise PatchError(f"{cur.path}: per-tensor base hashes disagree with {prev.path}'s targets (damaged patch)")
    return chain


def _chain_order(chain: list[PatchFile]) -> list[PatchFile] | None:
    """The order in which these patches would form a chain, if there is exactly one."""
    targets = {p.target_hash for p in chain}
    starts = [p for p in chain if p.base_hash not in targets]
    by_base = {}
    for p in chain:
        by_base.setdefault(p.base_hash, []).append(p)
    if len(starts) != 1:
        return None
    order = [starts[0]]
    while len(order) < len(chain):
        nxt = by_base.get(order[-1].target_hash, [])
        if len(nxt) != 1:
            return None
        order.append(nxt[0])
    return order


def _check_base_layout(base: Checkpoint, first: PatchFile) -> None:
    """Names, dtypes and shapes of the base against what the first patch was made from (headers only)."""
    expected = {t["name"]: t for t in first.tensors if t.get("base_hash")}
    have = base.infos
    missing = [n for n in expected if n not in have]
    extra = [n for n in have if n not in expected]
    differ = []
    for n, t in expected.items():
        if n in have:
            dtype = t.get("base_dtype", t["dtype"])
            shape = t.get("base_shape", t["shape"])
            if ST_DTYPES.get(dtype) != have[n].dtype or list(have[n].shape) != list(shape):
                differ.append(f"{n} ({str(have[n].dtype)[6:]}{list(have[n].shape)}, expected {dtype}{list(shape)})")
    if missing or extra or differ:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing: {listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors: {listing(extra)}")
        if differ:
            parts.append(f"{len(differ)} with another dtype or shape: {listing(differ)}")
        raise WrongBaseError(
            f"{base.location} is not the base {first.path} was made from ({'; '.join(parts)}); nothing written"
        )


def _base_mismatch(base: Checkpoint, first: PatchFile, bad: list[str], got: str | None) -> WrongBaseError:
    what = f"base hash {short(got)}, " if got else ""
    return WrongBaseError(
        f"{base.location} is not the base {first.path} was made from: {len(bad)} tensor(s) differ "
        f"({listing(bad)}); {what}patch expects {short(first.base_hash)}; nothing written"
    )


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class _TensorPlan:
    name: str
    dtype: torch.dtype | None  # None: not in the output (removed)
    shape: tuple[int, ...] | None
    in_base: bool
    full_from: int | None  # index of the last patch storing it whole
    deltas: list[int]  # indices of patches with changes to apply after that
    target_hash: str | None
    base_hash: str | None


def _plan(chain: list[PatchFile], base_names: list[str]) -> list[_TensorPlan]:
    entries = [p.entries() for p in chain]
    order = list(base_names)
    seen = set(order)
    for e in entries:
        for n in e:
            if n not in seen:
                seen.add(n)
                order.append(n)
    plans = []
    for n in order:
        full_from, deltas, alive = None, [], n in base_names
        for i, e in enumerate(entries):
            t = e.get(n)
            if t is None:
                if alive:
                    raise PatchError(f"{chain[i].path}: does not list tensor {n!r} that its base holds (damaged patch)")
                continue
            if t["op"] == "remove":
                alive, full_from, deltas = False, None, []
            elif t["op"] == "full":
                alive, full_from, deltas = True, i, []
            elif t["op"] == "delta":
                deltas.append(i)
        last = entries[-1].get(n)
        base_sha = entries[0][n]["base_hash"] if n in entries[0] else None
        if alive:
            plans.append(
                _TensorPlan(n, ST_DTYPES[last["dtype"]], tuple(last["shape"]), n in base_names, full_from, deltas,
                            last["target_hash"], base_sha)
            )
        else:
            plans.append(_TensorPlan(n, None, None, n in base_names, None, [], None, base_sha))
    return plans


def _output_layout(base: Checkpoint | None, plans: list[_TensorPlan]) -> Layout:
    """The base's shards with removed tensors dropped and new ones appended to the last shard."""
    out = {p.name: (p.name, p.dtype, p.shape) for p in plans if p.dtype is not None}
    if base is None:
        specs = list(out.values())
        shards = plan_shards(specs, DEFAULT_MAX_SHARD_BYTES)
        return Layout(list(zip(shard_file_names(len(shards)), shards)))
    layout = layout_of(base)
    files = [(fname, [out[n] for n, _, _ in specs if n in out]) for fname, specs in layout.files]
    added = [out[p.name] for p in plans if p.dtype is not None and not p.in_base]
    files[-1] = (files[-1][0], files[-1][1] + added)
    files = [f for f in files if f[1]] or files[:1]  # a shard whose tensors were all removed is dropped
    return Layout(files, layout.file_metadata, layout.index_metadata, layout.folder)


# --------------------------------------------------------------------------------------------------- files
def _resolve_files(chain: list[PatchFile], base_folder: Path | None) -> list[tuple[str, object, str | None]] | None:
    """The output's non-weight files: (name, source, expected sha256), checked to exist before writing.

    A patch made with files lists the target folder's files exactly (embedded, or "same as in my base");
    one made without (``files: null``) leaves its base's files as they are.
    """
    current: dict[str, tuple[object, str | None]] | None = None
    if base_folder is not None:
        kept, _ = aux_files(base_folder, 1 << 62)  # weight-like files are never carried over
        current = {p.name: (p, None) for p in kept}
    for p in chain:
        files = p.manifest.get("files")
        if files is None:
            continue
        new, names = {}, set()
        for f in files:
            check_file_name(p.path, f["name"], names)  # checked on open too; these names become paths
            if f["source"] == "patch":
                new[f["name"]] = ((p, f), f["sha256"])
            else:
                src = (current or {}).get(f["name"])
                if src is None:
                    where = base_folder if base_folder is not None else "the base (not a model folder)"
                    raise WrongBaseError(
                        f"{p.path}: needs {f['name']!r} from its base, and {where} has no such file "
                        "(pass --weights-only to skip non-weight files); nothing written"
                    )
                if src[1] is not None and src[1] != f["sha256"]:
                    raise PatchError(
                        f"{p.path}: file {f['name']!r} hash disagrees with the previous patch (damaged patch)"
                    )
                new[f["name"]] = (src[0], f["sha256"])
        current = new
    if current is None:
        return None
    return [(name, src, sha) for name, (src, sha) in sorted(current.items())]


def _file_bytes(name: str, src, sha: str | None) -> bytes:
    if isinstance(src, Path):
        data = src.read_bytes()
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise WrongBaseError(
                f"{src}: differs from the {name!r} the patch was made against (sha256 "
                f"{short(hashlib.sha256(data).hexdigest())}, expected {short(sha)}); nothing written"
            )
        return data
    patch, entry = src
    (frame,) = patch.read_record(entry["record"], f"file {name!r}")
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(1, entry["nbytes"]))
    except zstandard.ZstdError as exc:
        raise PatchError(f"{patch.path}: file {name!r}: cannot decompress ({exc})") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise PatchError(f"{patch.path}: file {name!r} does not match its hash (damaged patch)")
    return data


# -------------------------------------------------------------------------------------------------- apply
def _words(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy().view(UINT_OF[t.element_size()])


def _cursor(patch: PatchFile, name: str, esize: int, *, check: bool = True) -> RecordCursor:
    """A decoder of one tensor's record; ``check=False`` when the patch was verified already."""
    e = patch.entries()[name]
    numel = int(e["numel"])
    if e["record"] is None:
        return RecordCursor(b"", b"", numel, esize, patch.block_numel, e["op"] == "full", name)
    frames = patch.read_record(e["record"], f"tensor {name!r}", check=check)
    pos, val = frames if len(frames) == 2 else (b"", frames[0])
    return RecordCursor(pos, val, numel, esize, patch.block_numel, e["op"] == "full", f"{patch.path}: tensor {name!r}")


def _read_step(chain: list[PatchFile], esize: int, read_bytes: int) -> int:
    """Elements per read: ``read_bytes`` worth, rounded down to whole coding blocks when the patches agree on
    their size (then every coding block is applied whole, without re-slicing its positions)."""
    step = max(1, read_bytes // esize)
    sizes = {p.block_numel for p in chain}
    if len(sizes) == 1:
        block = sizes.pop()
        if block <= step:
            step -= step % block
    return step


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
    read_bytes: int = DEFAULT_READ_BYTES,
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
            _check_base_layout(base_ck, chain[0])
        plans = _plan(chain, base_ck.names() if base_ck is not None else [])
        layout = _output_layout(base_ck, plans)
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
            files = _resolve_files(chain, layout.folder)
            file_data = [(name, _file_bytes(name, src, sha)) for name, src, sha in files or []]
        if base_ck is not None and verify_base_first:
            got = hash_checkpoint(base_ck, threads=2)
            bad = [p.name for p in plans if p.in_base and got.tensors[p.name] != p.base_hash]
            if bad or got.digest != chain[0].base_hash:
                raise _base_mismatch(base_ck, chain[0], bad, got.digest)

        def write_all(folder: Path | None) -> str:
            return _stream(
                chain, base_ck, plans, layout, folder, out, not verify_base_first, read_bytes, progress, direct_io,
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
        sum(_nbytes(p.dtype, p.shape) for p in kept),
        sum(int(e["changed"]) for p in chain for e in p.tensors),
        [n for n, _, _ in files or []] if files else [],
        time.perf_counter() - t0,
    )


def _stream(chain, base_ck, plans, layout, folder, out, verify_streaming, read_bytes, progress, direct_io,
            recheck_records=False) -> str:
    """Write every output tensor, shard by shard; returns the output's content hash (checked: the target's).

    Four threads share the work, each a few blocks ahead of the next: a reader reads (and, single pass,
    hashes) the base into recycled buffers; a decoder decompresses and decodes each patch's changes for the
    block; the calling thread applies them in chain order and hashes the result; a writer thread writes it
    (O_DIRECT when ``direct_io``) and hands the buffer back. Reads, hashing, numpy, zstd and disk writes
    release the GIL, so they overlap on as many cores as are free. ``recheck_records``: check each record's
    sha256 again as it is decoded (signed patches: what is decoded is then what the signature covered, even
    if the file changed after it was checked).
    """
    by_name = {p.name: p for p in plans}
    out_hashes: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(_nbytes(p.dtype, p.shape) for p in plans if p.dtype is not None)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="patch apply", delay=1.0, leave=False)

    def blocks():
        """Reader thread: (file, plan, start, stop, buffer, words, base digest on the last block).

        ``words`` (unsigned integers viewing ``buffer``, recycled through ``pool``) hold the base's bits, or
        nothing yet when the tensor's starting bits come from a patch storing it whole.
        """
        for fname, specs in layout.files:
            for name, dtype, shape in specs:
                p = by_name[name]
                esize = element_size(dtype)
                numel = int(np.prod(shape, dtype=np.int64))
                step = _read_step(chain, esize, read_bytes)
                h = None
                if verify_streaming and p.in_base:  # the base's own dtype and shape: a patch may re-type it
                    info = base_ck.info(name)
                    h = TensorHasher(name, info.dtype, info.shape)
                if p.full_from is not None and h:  # stored whole by a patch: the base copy is only checked
                    _hash_base(base_ck, p, h, read_bytes)
                for start in range(0, max(numel, 1), step):
                    stop = min(numel, start + step)
                    nbytes = (stop - start) * esize
                    buf = pool.get(nbytes)
                    words = buf[:nbytes].view(UINT_OF[esize])
                    if p.full_from is None:  # else the words come from the patch storing it whole
                        base_ck.read_flat_into(name, start, stop, buf)
                        if h:
                            h.update(words)
                    yield fname, p, start, stop, buf, words, h.hexdigest() if h and stop >= numel else None
        for p in plans:  # removed tensors are part of the base hash too
            if p.dtype is None and p.in_base and verify_streaming:
                info = base_ck.info(p.name)
                h = TensorHasher(p.name, info.dtype, info.shape)
                _hash_base(base_ck, p, h, read_bytes)
                if h.hexdigest() != p.base_hash:
                    raise _base_mismatch(base_ck, chain[0], [p.name], None)

    def decoded(items):
        """Decoder thread: the changes of each block, from every patch that touches the tensor, in chain order."""
        source: RecordCursor | None = None
        cursors: list[tuple[RecordCursor, str]] = []
        for fname, p, start, stop, buf, words, base_digest in items:
            if start == 0:  # a new tensor; every record was verified by apply_patches
                esize = element_size(p.dtype)
                check = recheck_records
                source = _cursor(chain[p.full_from], p.name, esize, check=check) if p.full_from is not None else None
                cursors = [(_cursor(chain[i], p.name, esize, check=check), chain[i].values) for i in p.deltas]
            changes = [(source.changes(start, stop), "set")] if source is not None else []
            changes += [(cur.changes(start, stop), cur.mode(coding)) for cur, coding in cursors]
            yield fname, p, start, stop, buf, words, base_digest, changes

    specs_of = dict(layout.files)
    writers: list[SafetensorsWriter] = []
    current_file = None
    weight_map, total = {}, 0
    hasher: TensorHasher | None = None
    # Threads pay off on large checkpoints; on small ones (the demo's 2 MB models) handing tiny blocks between
    # four threads costs more than the work: then everything runs here, in order.
    threaded = sum(_nbytes(p.dtype, p.shape) for p in plans if p.dtype is not None) > THREADS_FROM_BYTES
    sink = _Sink() if threaded else _InlineSink()
    sizes = {element_size(p.dtype) for p in plans if p.dtype is not None}
    pool = Recycler(max([_read_step(chain, e, read_bytes) * e for e in sizes], default=read_bytes), keep=8)

    def write_block(writer: SafetensorsWriter, buf: np.ndarray, nbytes: int) -> None:
        writer.write_part(buf[:nbytes])
        pool.give(buf)

    try:
        # reader -> decoder -> this thread
        stages = prefetch(decoded(prefetch(blocks(), depth=1)), depth=2) if threaded else decoded(blocks())
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
                    SafetensorsWriter(path, specs_of[fname], layout.file_metadata.get(fname), direct=direct_io and threaded)
                )
                for n, d, sh in specs_of[fname]:
                    weight_map[n] = fname
                    total += _nbytes(d, sh)
            writer = writers[-1]
            if start == 0:
                hasher = TensorHasher(p.name, p.dtype, p.shape)
            for ch, mode in changes:
                apply_changes(words, ch, mode)
            hasher.update(words)
            sink.submit(write_block, writer, buf, words.nbytes)
            if bar is not None:
                bar.update(words.nbytes)
            if stop >= numel:
                if base_digest is not None and base_digest != p.base_hash:
                    raise _base_mismatch(base_ck, chain[0], [p.name], None)
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
        import queue
        import threading

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


def _hash_base(base_ck: Checkpoint, p: _TensorPlan, h: TensorHasher, read_bytes: int) -> None:
    info = base_ck.info(p.name)
    numel, step = info.numel, max(1, read_bytes // element_size(info.dtype))
    for start in range(0, numel, step):
        h.update(base_ck.read_flat(p.name, start, min(numel, start + step)))


# ------------------------------------------------------------------------------------------------ in place
def model_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a patch of a live model covers: its state dict with shared storage listed once.

    Tied weights (``lm_head.weight`` sharing the embedding) appear once, under the first name, so a patch
    never changes one storage twice; the trainer and every receiver use this same function. Returns the
    state dict's detached tensors: writing to them writes to the model.
    """
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def apply_patch_(model, patch, *, verify: bool = True, trusted_keys=None) -> str:
    """Update a loaded model (or a dict of tensors) in place with one patch; returns the new content hash.

    The model's tensors (:func:`model_tensors`) must have the names, dtypes and shapes of the patch's base,
    and, with ``verify`` (the default), its content hash: a model that does not hold the base is refused
    before anything changes. Every record's hash is checked before the first write, and each changed tensor's
    hash after; if one does not match, every tensor already changed is restored. A full anchor needs no base.
    ``verify=False`` skips hashing the model (one pass over its bytes, at memory speed) when the caller tracks the
    hash itself. Tensors may live on any device; a patch cannot add, remove or re-shape tensors in place.
    ``trusted_keys``: as for :func:`apply_patches`; the signature is checked before anything changes.
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
    missing = [n for n in entries if n not in tensors]
    extra = [n for n in tensors if n not in entries]
    differ = [
        f"{n} ({str(tensors[n].dtype)[6:]}{list(tensors[n].shape)}, patch has {e['dtype']}{e['shape']})"
        for n, e in entries.items()
        if n in tensors and (ST_DTYPES.get(e["dtype"]) != tensors[n].dtype or list(tensors[n].shape) != e["shape"])
    ]
    if missing or extra or differ:
        parts = [f"{len(missing)} missing: {listing(missing)}"] if missing else []
        parts += [f"{len(extra)} not in the patch: {listing(extra)}"] if extra else []
        parts += [f"{len(differ)} with another dtype or shape: {listing(differ)}"] if differ else []
        raise WrongBaseError(
            f"the model does not have the tensors {p.path} was made for ({'; '.join(parts)}); nothing changed"
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
                flat = t.view(-1).view(_SIGNED[esize])
                pos, vals = _cursor(p, name, esize).take(0, t.numel())
                pos_t = torch.from_numpy(pos).to(t.device)
                vals_t = torch.from_numpy(vals.view(_NP_SIGNED[esize])).to(t.device)
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
