"""The patch file: a head, the tensors' records, a zstd-compressed JSON manifest, and a trailer.

    offset 0    8 bytes   magic b"RLSPATCH"
                u32       format version (little-endian; this code writes and reads 2)
                u32       flags (0)
    16          records   per changed tensor: its positions frame then its values frame (see codec.py);
                          per embedded file: one zstd frame of its bytes
    M           manifest  one zstd frame of UTF-8 JSON: versions, content hashes (hash_scheme), per-tensor
                          ops, counts and record locations with each record's sha256
    S           signature (signed patches only) a zstd skippable frame of 112 bytes, right after the manifest
                          frame: u32 0x184D2A5E, u32 104, 8 bytes b"RLSSIG1\\0", the signer's 32-byte Ed25519
                          public key, the 64-byte Ed25519 signature
    end - 56    trailer   u64 manifest offset M, u64 manifest length (with the signature frame, if any),
                          32-byte sha256 of those bytes, 8 bytes magic b"RLSPEND\\0"

Integrity is a chain: the trailer's hash covers the manifest; the manifest holds the sha256 of every record
and the content hashes of the base and the target (:mod:`rlsubnet.checkpoint.hashing`, ``xxh3-128-tensors-v1``). A truncated file loses its trailer; a changed byte
anywhere breaks one of the hashes. The manifest comes last so that records stream to disk as they are made,
one tensor in memory at a time; readers seek to the end. The version sits first so a newer format is
recognised before anything else is parsed.

Signatures (opt-in; :mod:`rlsubnet.patch.signing`). The signature covers every byte of the file before it
(head, records, manifest frame): it signs ``b"rlsubnet-patch-signature-v1\\0"`` followed by the sha256 of those
bytes. The trailer after it is not signed but is fully determined by what is: it locates the manifest and
hashes the manifest and signature frames, so a changed trailer is refused like any damaged one. The signature
sits inside the manifest area as a zstd skippable frame rather than after the trailer so that signed patches
stay readable, unchecked, by readers that predate signatures (they decompress the manifest's frame and ignore
what follows it); unsigned patches are byte-for-byte what they were. A reader knows a patch is signed when
the manifest area ends with that exact 112-byte frame. What the hashes and the signature do and do not
protect against: ``docs/security.md``.

Names. Every embedded file's name is a plain file name (no separator, no ``.``/``..``, nothing absolute, no
control character: :func:`rlsubnet.fileio.member_name_problem`), is not a weight or index file name, and
appears once; a manifest that breaks this is refused when the patch is opened, before anything is written.

Version 1 (never released) recorded SHA-256 content hashes under ``base_sha256``/``target_sha256``; version 2
records XXH3-128 content hashes under ``base_hash``/``target_hash``. Everything else is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard

from rlsubnet.checkpoint.hashing import HASH_SCHEME, combine_hashes
from rlsubnet.patch.errors import PatchError
from rlsubnet.patch.manifest_checks import (
    FORMAT_VERSION,
    _check_record,
    _check_tensor_entry,
    _check_version,
    _count,
    _positive_int,
    _require,
    check_file_name,
)
from rlsubnet.patch.signing import fingerprint, load_private_key, sign_digest, verify_digest
from rlsubnet.patch.signing import trusted_keys as as_trusted
from rlsubnet.staged import StagedFile

MAGIC = b"RLSPATCH"
END_MAGIC = b"RLSPEND\0"
FORMAT_NAME = "rlsubnet-patch"
HEAD = struct.Struct("<8sII")
TRAILER = struct.Struct("<QQ32s8s")
SIG_FRAME = struct.Struct("<II8s32s64s")  # zstd skippable frame: magic, payload length, then our payload
SKIPPABLE_MAGIC = 0x184D2A5E
SIG_MAGIC = b"RLSSIG1\0"
SUFFIX = ".rlpatch"

OPS = ("same", "delta", "full", "remove")
TOTALS_KEYS = (
    "numel",
    "changed",
    "compared_numel",
    "compared_changed",
    "tensors_changed",
    "tensors_full",
    "tensors_removed",
    "positions_nbytes",
    "values_nbytes",
)
KINDS = ("delta", "anchor")
MANIFEST_LEVEL = 9


def _sha256(*parts: bytes | bytearray | memoryview) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class PatchWriter(StagedFile):
    """Write a patch file: records first, streamed to a temporary file, then the manifest and trailer.

    The file appears under its final name only when :meth:`finish` succeeds (fsync, then rename).
    ``sign_key`` (a key file path, an ``Ed25519PrivateKey`` or its 32 raw bytes): sign the patch; every byte
    written is hashed on the way, so signing costs no second read.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, sign_key=None):
        self._key = None
        self._sha = None
        if sign_key is not None:  # a bad key fails here, before any file is created
            self._key = load_private_key(sign_key)
            self._sha = hashlib.sha256()
        self.path = Path(path)
        if self.path.is_dir():
            raise PatchError(f"{self.path}: is a folder; give a file name for the patch")
        if self.path.exists() and not overwrite:
            raise PatchError(f"{self.path}: exists (choose another output or pass --overwrite)")
        super().__init__(self.path, PatchError)
        self._overwrite = overwrite
        self._write(HEAD.pack(MAGIC, FORMAT_VERSION, 0))
        self._offset = HEAD.size

    def _write(self, data) -> None:
        self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)

    def add_record(self, *frames: bytes) -> dict:
        """Append one record (one or more frames); returns its location and hash for the manifest."""
        start = self._offset
        h = hashlib.sha256()
        for frame in frames:
            self._write(frame)
            h.update(frame)
            self._offset += len(frame)
        return {"offset": start, "nbytes": [len(f) for f in frames], "sha256": h.hexdigest()}

    def finish(self, manifest: dict) -> int:
        """Write manifest and trailer, move the file into place; returns the patch size in bytes."""
        raw = json.dumps(manifest, separators=(",", ":"), sort_keys=False).encode("utf-8")
        frame = zstandard.ZstdCompressor(level=MANIFEST_LEVEL).compress(raw)
        self._write(frame)
        if self._key is not None and self._sha is not None:  # set together in __init__
            public, signature = sign_digest(self._key, self._sha.digest())
            sig = SIG_FRAME.pack(SKIPPABLE_MAGIC, SIG_FRAME.size - 8, SIG_MAGIC, public, signature)
            self._f.write(sig)
            frame += sig
        self._f.write(TRAILER.pack(self._offset, len(frame), hashlib.sha256(frame).digest(), END_MAGIC))
        size = self._offset + len(frame) + TRAILER.size

        def refuse_if_created() -> None:  # a writer that took no lock finished first
            if self.path.exists() and not self._overwrite:
                raise PatchError(f"{self.path}: was created by another run meanwhile; not replaced (pass --overwrite)")

        self._commit(refuse_if_created)
        return size

    def __exit__(self, exc_type, exc, tb):
        if not self._f.closed:  # an exception, or finish() never called: leave nothing behind
            self.abort()


@dataclass(frozen=True)
class PatchSignature:
    """A patch's signature: the signer's raw public key, the signature, and where it starts in the file."""

    public_key: bytes
    signature: bytes
    offset: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def _split_signature(area: bytes, area_offset: int) -> tuple[bytes, PatchSignature | None]:
    """The manifest frame and the signature of a manifest area (see the module docstring)."""
    if len(area) > SIG_FRAME.size:
        magic, length, sig_magic, public, signature = SIG_FRAME.unpack_from(area, len(area) - SIG_FRAME.size)
        if magic == SKIPPABLE_MAGIC and length == SIG_FRAME.size - 8 and sig_magic == SIG_MAGIC:
            start = len(area) - SIG_FRAME.size
            return area[:start], PatchSignature(public, signature, area_offset + start)
    return area, None


@dataclass
class PatchFile:
    """An opened patch: its manifest is parsed and checked; records are read (and hash-checked) on demand."""

    path: Path
    manifest: dict
    manifest_sha256: str
    nbytes: int
    manifest_offset: int = 0
    signature: PatchSignature | None = None

    # -- opening
    @classmethod
    def open(cls, path: str | Path) -> PatchFile:
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
        frame, signature = _split_signature(frame, m_off)
        try:
            manifest = json.loads(zstandard.ZstdDecompressor().decompress(frame, max_output_size=1 << 31))
        except (zstandard.ZstdError, UnicodeDecodeError, ValueError) as exc:
            raise PatchError(f"{path}: damaged manifest ({exc})") from None
        p = cls(path, manifest, m_hash.hex(), size, m_off, signature)
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
        _require(
            path,
            "manifest",
            m,
            {"block_numel": _positive_int, "totals": dict, "target": dict, "zstd_level": int, "rlsubnet_version": str},
        )
        _require(path, "totals", m["totals"], {k: _count for k in TOTALS_KEYS})
        for side in ("base", "target") if m["kind"] == "delta" else ("target",):
            _require(path, side, m.get(side), {"hash": str, "tensors": _count, "numel": _count, "nbytes": _count})
        base_hashes: dict[str, str] = {}
        target_hashes: dict[str, str] = {}
        seen: set[str] = set()
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise PatchError(f"{path}: damaged manifest (a tensor entry without a name)")
            name, op = t["name"], t.get("op")
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
        files = m.get("files")
        if files is not None and not isinstance(files, list):
            raise PatchError(f"{path}: damaged manifest (files is not a list)")
        file_names: set[str] = set()
        for f in files or []:
            check_file_name(path, f.get("name") if isinstance(f, dict) else None, file_names)
            _require(path, f"file entry {f.get('name')!r}", f, {"name": str, "nbytes": _count, "sha256": str})
            if f.get("source") not in ("patch", "base"):
                raise PatchError(
                    f"{path}: damaged manifest (file {f['name']!r} has unknown source {f.get('source')!r})"
                )
            rec = f.get("record")
            if f["source"] == "patch" and rec is None:
                raise PatchError(f"{path}: damaged manifest (file {f['name']!r} is embedded but has no record)")
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

    def check_signature(self, trusted_keys) -> None:
        """Refuse the patch unless a key of ``trusted_keys`` signed it and the signature holds.

        ``trusted_keys``: None (no check: integrity rests on the hashes alone), or what
        :func:`rlsubnet.patch.signing.trusted_keys` takes. Reads the patch once, up to the signature; the bytes
        read must also hold the manifest this object parsed, so a file replaced since :meth:`open` is refused.
        """
        keys = as_trusted(trusted_keys)
        if keys is None:
            return
        sig, path = self.signature, self.path
        if sig is None:
            raise PatchError(f"{path}: not signed, and signed patches from trusted keys are required; refused")
        key = keys.keys.get(sig.public_key)
        if key is None:
            raise PatchError(
                f"{path}: signed by key {sig.fingerprint}, which is not trusted (trusted: "
                f"{', '.join(keys.fingerprints())}); refused"
            )
        file_sha, area_sha = hashlib.sha256(), hashlib.sha256()
        area_end = self.nbytes - TRAILER.size
        try:
            with open(path, "rb", buffering=0) as f:
                pos = 0
                while pos < area_end:
                    chunk = f.read(min(1 << 23, area_end - pos))
                    if not chunk:
                        break
                    if pos < sig.offset:
                        file_sha.update(chunk[: sig.offset - pos])
                    lo = max(0, self.manifest_offset - pos)
                    if lo < len(chunk):
                        area_sha.update(chunk[lo:])
                    pos += len(chunk)
        except OSError as exc:
            raise PatchError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if pos < area_end or area_sha.hexdigest() != self.manifest_sha256:
            raise PatchError(f"{path}: changed while it was being read; refused")
        if not verify_digest(key, sig.signature, file_sha.digest()):
            raise PatchError(
                f"{path}: bad signature for key {sig.fingerprint}: the patch was modified after it was signed; refused"
            )

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


def is_patch_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the patch magic (cheap: reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
