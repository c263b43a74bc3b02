"""How masks are stored: bits packed 8 to a byte, in a safetensors file with the metadata that says what they mean.

Each tensor's mask is its flattened boolean array packed 8 entries per byte with ``numpy.packbits(...,
bitorder="big")`` (entry 0 is the most significant bit of byte 0; the unused bits of the last byte are zero),
so a mask costs ~1 bit per parameter, in memory and on disk.

File format (``format = "rlsubnet.mask"``, ``format_version = 2``): a safetensors file holding one 1-D uint8
tensor per checkpoint tensor, under the checkpoint tensor's own name, plus these ``__metadata__`` strings:

===================  =================================================================================
``format``           ``rlsubnet.mask``
``format_version``   ``2`` (version 1 had no ``meta_sha256``; such files are still read)
``rlsubnet_version`` version that wrote the file
``kind``             ``changed`` (built from a pair), ``random`` (a baseline) or ``union`` /
                     ``intersection`` / ``difference`` (combined)
``atol``             JSON number (null for a combination of masks at different tolerances)
``dtype``            comparison mode the changed-test ran in: ``bf16`` / ``fp32`` / ``native`` (JSON; the
                     key predates the mode's own name and stays, so existing files keep loading)
``density``          changed / numel over all tensors (repr of a float)
``numel``            parameters covered; ``changed``: entries set
``bitorder``         ``big``
``tensors``          JSON object, in file order: name -> {"shape": [...], "changed": n}
``base``, ``tuned``  JSON record of each checkpoint (see :func:`rlsubnet.masks.build.checkpoint_record`)
``extra``            JSON: everything else (random-mask settings, operands of a combination, skipped tensors)
``bits_sha256``      SHA-256 over (name, shape, packed bytes) of every tensor: any flipped bit is detected
``meta_sha256``      SHA-256 over every field above (:func:`metadata_sha256`): a changed digit of ``atol`` is
                     detected too, not read as another tolerance
===================  =================================================================================

Loading checks everything: format, dtype and length of every packed tensor, zero padding bits, the recorded
per-tensor counts and both checksums, so a corrupt or truncated mask file is an error, never a silently
different mask.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Final

import numpy as np
import torch

from rlsubnet._bits import POPCOUNT
from rlsubnet._version import __version__
from rlsubnet.checkpoint.index import read_safetensors_header
from rlsubnet.checkpoint.reader import SafetensorsCheckpoint
from rlsubnet.checkpoint.writer import SafetensorsWriter
from rlsubnet.errors import CheckpointError, listing
from rlsubnet.masks.errors import MaskError

FORMAT = "rlsubnet.mask"
FORMAT_VERSION = 2
BITORDER: Final = "big"
# The metadata fields meta_sha256 covers, in this order: every field a reader uses, and the informational ones.
META_KEYS = (
    "format", "format_version", "rlsubnet_version", "kind", "atol", "dtype", "density", "numel", "changed",
    "bitorder", "tensors", "base", "tuned", "extra", "bits_sha256",
)  # fmt: skip


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def popcount(packed: np.ndarray) -> int:
    """Number of set bits in a packed uint8 array (chunked: no full-size temporary)."""
    total = 0
    step = 1 << 24
    for i in range(0, packed.size, step):
        total += int(POPCOUNT[packed[i : i + step]].sum(dtype=np.int64))
    return total


def pack_bool(flags: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack a boolean array (any shape, flattened in C order) into bytes, big bit order."""
    if isinstance(flags, torch.Tensor):
        flags = flags.detach().cpu().reshape(-1).to(torch.bool).numpy()
    return np.packbits(np.asarray(flags, dtype=bool).reshape(-1), bitorder=BITORDER)


def unpack_bool(packed: np.ndarray, numel: int) -> np.ndarray:
    return np.unpackbits(packed, count=numel, bitorder=BITORDER).view(bool)


def pad_bits_clear(packed: np.ndarray, numel: int) -> bool:
    rem = numel % 8
    if rem == 0 or packed.size == 0:
        return True
    return int(packed[-1]) & ((1 << (8 - rem)) - 1) == 0


def metadata_sha256(md: dict[str, str]) -> str:
    """SHA-256 over the :data:`META_KEYS` fields of a mask file's metadata (a missing field counts as null).
    Fields other tools add are not covered: rlsubnet does not read them."""
    h = hashlib.sha256()
    for key in META_KEYS:
        h.update(json.dumps([key, md.get(key)]).encode("utf-8") + b"\n")
    return h.hexdigest()


def check_metadata_sha256(path: Path, md: dict[str, str]) -> None:
    """Refuse metadata that type-checks but is not what was written (another atol, kind or mode)."""
    if int(md["format_version"]) < 2 and "meta_sha256" not in md:
        return  # written before the metadata had a checksum
    if "meta_sha256" not in md:
        raise MaskError(f"{path}: corrupt mask metadata (no meta_sha256 checksum)")
    if md["meta_sha256"] != metadata_sha256(md):
        raise MaskError(f"{path}: corrupt mask metadata (checksum of the metadata does not match meta_sha256)")


def file_metadata(mask) -> dict[str, str]:
    """The safetensors ``__metadata__`` strings ``mask`` is saved with (deterministic: no timestamps)."""
    dump = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"))  # noqa: E731
    md = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "rlsubnet_version": __version__,
        "kind": str(mask.kind),
        "atol": dump(mask.atol),
        "dtype": dump(mask.mode),
        "density": repr(mask.density),
        "numel": str(mask.numel),
        "changed": str(mask.changed),
        "bitorder": BITORDER,
        "tensors": json.dumps(
            {n: {"shape": list(s), "changed": c} for (n, s), c in zip(mask.shapes.items(), mask.counts.values())},
            separators=(",", ":"),
        ),
        "base": dump(mask.meta.get("base")),
        "tuned": dump(mask.meta.get("tuned")),
        "extra": dump(mask.meta.get("extra", {})),
        "bits_sha256": mask.bits_sha256(),
    }
    md["meta_sha256"] = metadata_sha256(md)
    return md


def write_mask_file(mask, path: Path) -> Path:
    """Write ``mask`` to ``path`` atomically (the caller holds the output's lock)."""
    specs = [(n, torch.uint8, (packed_size(math.prod(s)),)) for n, s in mask.shapes.items()]
    with SafetensorsWriter(path, specs, file_metadata(mask)) as w:
        for name, _, _ in specs:
            w.write_part(mask.packed(name))
            w.end_tensor(name)
    return path


def read_mask_file(path: Path) -> tuple[dict, dict, dict, dict, dict[str, str]]:
    """(shapes, packed bytes, meta, recorded per-tensor counts, the metadata strings) of a mask file, after every
    check that needs no unpacking: format, version, metadata types, the tensors stored against those described.
    The caller checks the bits against the counts and ``bits_sha256``, then :func:`check_metadata_sha256`."""
    path = Path(path)
    if path.is_dir():
        raise MaskError(f"{path}: is a folder, not a mask file (masks are single .safetensors files)")
    if not path.is_file():
        raise MaskError(f"{path}: no such mask file")
    try:
        infos, md = read_safetensors_header(path)
    except CheckpointError as exc:
        raise MaskError(f"not a readable mask file: {exc}") from None
    if md.get("format") != FORMAT:
        raise MaskError(
            f"{path}: not an rlsubnet mask (metadata format is {md.get('format')!r}, expected {FORMAT!r}); "
            "build one with `rlsubnet mask BASE TUNED -o FILE`"
        )
    try:
        version = int(md.get("format_version", ""))
    except ValueError:
        raise MaskError(f"{path}: corrupt mask metadata (format_version {md.get('format_version')!r})") from None
    if version > FORMAT_VERSION:
        raise MaskError(f"{path}: mask format version {version} is newer than this rlsubnet reads ({FORMAT_VERSION})")
    if md.get("bitorder", BITORDER) != BITORDER:
        raise MaskError(f"{path}: unsupported bit order {md.get('bitorder')!r}")
    try:
        tensors = json.loads(md["tensors"])
        meta = {
            "kind": md.get("kind", "changed"),
            "atol": json.loads(md.get("atol", "null")),
            "dtype": json.loads(md.get("dtype", "null")),
            "base": json.loads(md.get("base", "null")),
            "tuned": json.loads(md.get("tuned", "null")),
            "extra": json.loads(md.get("extra", "{}")),
            "rlsubnet_version": md.get("rlsubnet_version"),
        }
        shapes = {str(n): tuple(_dim(s) for s in rec["shape"]) for n, rec in tensors.items()}
        counts = {str(n): _dim(rec["changed"]) for n, rec in tensors.items()}
        _check_meta_types(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MaskError(f"{path}: corrupt mask metadata ({type(exc).__name__}: {exc})") from None
    if set(infos) != set(shapes):
        missing = sorted(set(shapes) - set(infos))
        extra = sorted(set(infos) - set(shapes))
        raise MaskError(
            f"{path}: corrupt mask: metadata and stored tensors differ (not stored: {listing(missing) or '-'}; "
            f"not described: {listing(extra) or '-'})"
        )
    packed = {}
    ck = SafetensorsCheckpoint(str(path), str(path), [path])
    try:
        for name, shape in shapes.items():
            info = infos[name]
            want = packed_size(math.prod(shape))
            if info.dtype != torch.uint8 or info.shape != (want,):
                raise MaskError(
                    f"{path}: corrupt mask tensor {name!r}: stored as {info.dtype} {list(info.shape)}, "
                    f"expected uint8 [{want}] for shape {list(shape)}"
                )
            try:
                packed[name] = ck.read_flat(name, 0, want).numpy()
            except CheckpointError as exc:
                raise MaskError(f"corrupt mask: {exc}") from None
    finally:
        ck.close()
    return shapes, packed, meta, counts, md


def _dim(v: object) -> int:
    # A dimension or a count: a non-negative JSON integer (not 1.5, not true, not -5).
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _check_meta_types(meta: dict) -> None:
    # A field of the wrong type must fail here, naming it, not deep in a report (a version-1 file has no checksum
    # of its metadata).
    atol = meta["atol"]
    if atol is not None and (not isinstance(atol, (int, float)) or isinstance(atol, bool) or not 0 <= atol < math.inf):
        raise ValueError(f"atol is {atol!r}")
    if meta["dtype"] is not None and not isinstance(meta["dtype"], str):
        raise ValueError(f"dtype is {meta['dtype']!r}")
    if not isinstance(meta["kind"], str):
        raise ValueError(f"kind is {meta['kind']!r}")
    for key in ("base", "tuned"):
        if meta[key] is not None and not isinstance(meta[key], dict):
            raise ValueError(f"{key} is {type(meta[key]).__name__}, expected an object")
    if not isinstance(meta["extra"], dict):
        raise ValueError(f"extra is {type(meta['extra']).__name__}, expected an object")
