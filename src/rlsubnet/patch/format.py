"""The patch file: a head, the tensors' records, a zstd-compressed JSON manifest, and a trailer.

    offset 0    8 bytes   magic b"RLSPATCH"
                u32       format version (little-endian; this code writes and reads 2)
                u32       flags (0)
    16          records   per changed tensor: its positions frame then its values frame (see codec.py);
                          per embedded file: one zstd frame of its bytes
    M           manifest  one zstd frame of UTF-8 JSON: versions, content hashes (hash_scheme), per-tensor
                          ops, counts and record locations with each record's sha256
    end - 56    trailer   u64 manifest offset M, u64 manifest length, 32-byte sha256 of the manifest frame,
                          8 bytes magic b"RLSPEND\\0"

Integrity is a chain: the trailer's hash covers the manifest; the manifest holds the sha256 of every record
and the content hashes of the base and the target (:mod:`rlsubnet.checkpoint.hashing`, ``xxh3-128-tensors-v1``). A truncated file loses its trailer; a changed byte
anywhere breaks one of the hashes. The manifest comes last so that records stream to disk as they are made,
one tensor in memory at a time; readers seek to the end. The version sits first so a newer format is
recognised before anything else is parsed.

Version 1 (never released) recorded SHA-256 content hashes under ``base_sha256``/``target_sha256``; version 2
records XXH3-128 content hashes under ``base_hash``/``target_hash``. Everything else is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard

from rlsubnet._version import __version__
from rlsubnet.checkpoint.hashing import HASH_SCHEME, combine_hashes
from rlsubnet.checkpoint.index import ST_DTYPES
from rlsubnet.fileio import temp_file_beside
from rlsubnet.patch.errors import PatchError, PatchVersionError

MAGIC = b"RLSPATCH"
END_MAGIC = b"RLSPEND\0"
FORMAT_VERSION = 2
FORMAT_NAME = "rlsubnet-patch"
HEAD = struct.Struct("<8sII")
TRAILER = struct.Struct("<QQ32s8s")
SUFFIX = ".rlpatch"

OPS = ("same", "delta", "full", "remove")
TOTALS_KEYS = ("numel", "changed", "compared_numel", "compared_changed", "tensors_changed", "tensors_full",
               "tensors_removed", "positions_nbytes", "values_nbytes")
KINDS = ("delta", "anchor")
MANIFEST_LEVEL = 9


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class PatchWriter:
    """Write a patch file: records first, streamed to a temporary file, then the manifest and trailer.

    The file appears under its final name only when :meth:`finish` succeeds (fsync, then rename).
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise PatchError(f"{self.path}: is a folder; give a file name for the patch")
        if self.path.exists() and not overwrite:
            raise PatchError(f"{self.path}: exists (choose another output or pass --overwrite)")
        fd, tmp = temp_file_beside(self.path, PatchError)
        self._overwrite = overwrite
        self._tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")
        self._f.write(HEAD.pack(MAGIC, FORMAT_VERSION, 0))
        self._offset = HEAD.size

    def add_record(self, *frames: bytes) -> dict:
        """Append one record (one or more frames); returns its location and hash for the manifest."""
        start = self._offset
        h = hashlib.sha256()
        for frame in frames:
            self._f.write(frame)
            h.update(frame)
            self._offset += len(frame)
        return {"offset": start, "nbytes": [len(f) for f in frames], "sha256": h.hexdigest()}

    def finish(self, manifest: dict) -> int:
        """Write manifest and trailer, move the file into place; returns the patch size in bytes."""
        raw = json.dumps(manifest, separators=(",", ":"), sort_keys=False).encode("utf-8")
        frame = zstandard.ZstdCompressor(level=MANIFEST_LEVEL).compress(raw)
        self._f.write(frame)
        self._f.write(TRAILER.pack(self._offset, len(frame), hashlib.sha256(frame).digest(), END_MAGIC))
        size = self._offset + len(frame) + TRAILER.size
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.path.exists() and not self._overwrite:  # a writer that took no lock finished first
            self._tmp.unlink(missing_ok=True)
            raise PatchError(f"{self.path}: was created by another run meanwhile; not replaced (pass --overwrite)")
        os.replace(self._tmp, self.path)
        return size

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._f.closed:  # an exception, or finish() never called: leave nothing behind
            self.abort()


@dataclass
class PatchFile:
    """An opened patch: its manifest is parsed and checked; records are read (and hash-checked) on demand."""

    path: Path
    manifest: dict
    manifest_sha256: str
    nbytes: int

    # -- opening
    @classmethod
    def open(cls, path: str | Path) -> "PatchFile":
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(HEAD.size)
                if len(head) < HEAD.size or head[:8] != MAGIC:
                    raise PatchError(f"{path}: not an rlsubnet patch (no RLSPATCH magic at the start)")
                _, version, flags = HEAD.unpack(head)
                _check_version(path, version)
                if flags != 0:
                    raise PatchError(
                        f"{path}: unknown header flags {flags:#x} (damaged, or written by a newer rlsubnet)"
                    )
                if size < HEAD.size + TRAILER.size:
                    raise PatchError(f"{path}: truncated patch ({size} bytes; no trailer)")
                f.seek(size - TRAILER.size)
                m_off, m_len, m_hash, end = TRAILER.unpack(f.read(TRAILER.size))
                if end != END_MAGIC:
                    raise PatchError(f"{path}: truncated or damaged patch (no end marker; {size} bytes)")
                if m_off < HEAD.size or m_off + m_len != size - TRAILER.size:
                    raise PatchError(f"{path}: damaged patch (manifest location {m_off}+{m_len} in a {size}-byte file)")
                f.seek(m_off)
                frame = f.read(m_len)
        except OSError as exc:
            raise PatchError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if hashlib.sha256(frame).digest() != m_hash:
            raise PatchError(f"{path}: manifest hash mismatch: the patch was modified or damaged")
        try:
            manifest = json.loads(zstandard.ZstdDecompressor().decompress(frame, max_output_size=1 << 31))
        except (zstandard.ZstdError, UnicodeDecodeError, ValueError) as exc:
            raise PatchError(f"{path}: damaged manifest ({exc})") from None
        p = cls(path, manifest, m_hash.hex(), size)
        try:
            p._validate(version, m_off)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise PatchError(f"{path}: damaged manifest ({type(exc).__name__}: {exc})") from None
        return p

    def _validate(self, head_version: int, records_end: int) -> None:
        m, path = self.manifest, self.path
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise PatchError(f"{path}: manifest is not an {FORMAT_NAME} manifest")
        if m.get("format_version") != head_version:
            raise PatchError(
                f"{path}: damaged patch (head says format {head_version}, manifest {m.get('format_version')})"
            )
        if m.get("hash_scheme") != HASH_SCHEME:
            raise PatchError(
                f"{path}: unknown hash scheme {m.get('hash_scheme')!r} (this rlsubnet knows {HASH_SCHEME})"
            )
        if m.get("kind") not in KINDS:
            raise PatchError(f"{path}: unknown patch kind {m.get('kind')!r}")
        if m.get("values") not in ("xor", "absolute"):
            raise PatchError(f"{path}: unknown value coding {m.get('values')!r}")
        tensors = m.get("tensors")
        if not isinstance(tensors, list):
            raise PatchError(f"{path}: manifest has no tensor list")
        _require(path, "manifest", m, {"block_numel": _positive_int, "totals": dict, "target": dict,
                                       "zstd_level": int, "rlsubnet_version": str})
        _require(path, "totals", m["totals"], {k: _count for k in TOTALS_KEYS})
        for side in ("base", "target") if m["kind"] == "delta" else ("target",):
            _require(path, side, m.get(side), {"hash": str, "tensors": _count, "numel": _count, "nbytes": _count})
        base_hashes, target_hashes, seen = {}, {}, set()
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise PatchError(f"{path}: damaged manifest (a tensor entry without a name)")
            name, op = t.get("name"), t.get("op")
            if name in seen:
                raise PatchError(f"{path}: tensor {name!r} listed twice")
            seen.add(name)
            if op not in OPS:
                raise PatchError(f"{path}: tensor {name!r} has unknown op {op!r}")
            _check_tensor_entry(path, t)
            if m["kind"] == "anchor" and op != "full":
                raise PatchError(f"{path}: tensor {name!r}: an anchor stores every tensor whole (damaged manifest)")
            if t.get("base_hash"):
                base_hashes[name] = t["base_hash"]
            if t.get("target_hash"):
                target_hashes[name] = t["target_hash"]
            rec = t.get("record")
            if rec is not None:
                end = rec["offset"] + sum(rec["nbytes"])
                if rec["offset"] < HEAD.size or end > records_end:
                    raise PatchError(f"{path}: tensor {name!r}: record outside the records area (damaged manifest)")
        for f in m.get("files") or []:
            _require(path, f"file entry {f.get('name')!r}" if isinstance(f, dict) else "a file entry", f,
                     {"name": str, "nbytes": _count, "sha256": str})
            rec = f.get("record")
            if rec is not None:
                _check_record(path, f"file {f['name']!r}", rec)
            if rec is not None and (rec["offset"] < HEAD.size or rec["offset"] + sum(rec["nbytes"]) > records_end):
                raise PatchError(f"{path}: file {f.get('name')!r}: record outside the records area (damaged manifest)")
        base, target = m.get("base"), m.get("target")
        if m["kind"] == "delta":
            if not base or combine_hashes(base_hashes) != base.get("hash"):
                raise PatchError(f"{path}: damaged manifest (per-tensor base hashes do not combine to the base hash)")
        if not target or combine_hashes(target_hashes) != target.get("hash"):
            raise PatchError(f"{path}: damaged manifest (per-tensor target hashes do not combine to the target hash)")

    # -- what is inside
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def base_hash(self) -> str | None:
        base = self.manifest.get("base")
        return base["hash"] if base else None

    @property
    def target_hash(self) -> str:
        return self.manifest["target"]["hash"]

    @property
    def values(self) -> str:
        return self.manifest["values"]

    @property
    def block_numel(self) -> int:
        return int(self.manifest["block_numel"])

    @property
    def tensors(self) -> list[dict]:
        return self.manifest["tensors"]

    def entries(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.manifest["tensors"]}

    # -- records
    def read_record(self, rec: dict, what: str, *, check: bool = True) -> list[memoryview]:
        """The frames of one record, after checking its sha256 (names ``what`` on a mismatch).

        ``check=False`` skips the sha256 for callers that ran :meth:`verify` already and check what they
        decode some other way (``apply`` checks every output tensor's content hash).
        """
        size = sum(rec["nbytes"])
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(rec["offset"])
                data = bytearray(size)
                got = f.readinto(data)
                while got < size:
                    more = f.readinto(memoryview(data)[got:])
                    if not more:
                        break
                    got += more
        except OSError as exc:
            raise PatchError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if got < size:
            raise PatchError(f"{self.path}: {what}: record cut short: the patch was modified or damaged")
        if check and _sha256(data) != rec["sha256"]:
            raise PatchError(f"{self.path}: {what}: record hash mismatch: the patch was modified or damaged")
        frames, pos, view = [], 0, memoryview(data)
        for n in rec["nbytes"]:
            frames.append(view[pos : pos + n])
            pos += n
        return frames

    def verify(self) -> None:
        """Check every record's hash (reads the whole patch once)."""
        for t in self.tensors:
            if t.get("record") is not None:
                self.read_record(t["record"], f"tensor {t['name']!r}")
        for f in self.manifest.get("files") or []:
            if f.get("record") is not None:
                self.read_record(f["record"], f"file {f['name']!r}")

    def __repr__(self) -> str:
        return f"PatchFile({str(self.path)!r}, {self.kind}, {len(self.tensors)} tensors)"


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_int(v) -> bool:
    return _count(v) and v > 0


def _require(path: Path, what: str, obj, fields: dict) -> None:
    """Each key of ``fields`` is present in ``obj`` with the right type (a type, or a predicate)."""
    if not isinstance(obj, dict):
        raise PatchError(f"{path}: damaged manifest ({what} is not an object)")
    for key, kind in fields.items():
        v = obj.get(key)
        ok = isinstance(v, kind) if isinstance(kind, type) else kind(v)
        if not ok:
            raise PatchError(f"{path}: damaged manifest ({what} has no valid {key!r}: {v!r})")


def _check_record(path: Path, what: str, rec) -> None:
    _require(path, f"{what}'s record", rec, {"offset": _count, "sha256": str, "nbytes": list})
    if not all(_count(n) for n in rec["nbytes"]):
        raise PatchError(f"{path}: damaged manifest ({what}'s record has invalid frame sizes)")


def _check_tensor_entry(path: Path, t: dict) -> None:
    """The keys every reader of an entry relies on, so a damaged manifest fails here, not in a KeyError later."""
    what = f"tensor {t['name']!r}"
    op = t["op"]
    if op == "remove":
        _require(path, what, t, {"base_hash": str})
        return
    _require(path, what, t, {"dtype": str, "shape": list, "numel": _count, "changed": _count, "target_hash": str})
    if t["dtype"] not in ST_DTYPES or not all(_count(d) for d in t["shape"]):
        raise PatchError(f"{path}: damaged manifest ({what} has dtype {t['dtype']!r}, shape {t['shape']!r})")
    numel = math.prod(t["shape"])
    if numel != t["numel"] or t["changed"] > numel:
        raise PatchError(f"{path}: damaged manifest ({what}: numel {t['numel']}, changed {t['changed']}, shape {t['shape']})")
    if op in ("same", "delta"):
        _require(path, what, t, {"base_hash": str})
    if op in ("delta", "full"):
        if t.get("record") is None and (op == "full" or t["changed"]):
            raise PatchError(f"{path}: damaged manifest ({what}: op {op} without a record)")
    if t.get("record") is not None:
        _check_record(path, what, t["record"])


def _check_version(path: Path, version: int) -> None:
    if version > FORMAT_VERSION:
        raise PatchVersionError(
            f"{path}: patch format version {version} is newer than this rlsubnet {__version__} reads "
            f"(up to {FORMAT_VERSION}); upgrade rlsubnet to apply it"
        )
    if version == 1:
        raise PatchVersionError(
            f"{path}: patch format version 1 (SHA-256 content hashes, from a development version of rlsubnet) "
            f"is no longer read; re-create the patch with rlsubnet {__version__}"
        )
    if version < 1:
        raise PatchError(f"{path}: invalid patch format version {version}")


def is_patch_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the patch magic (cheap: reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
