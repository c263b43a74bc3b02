"""The mask artifact: one bit per parameter, packed, with the metadata that says what the bits mean.

A mask m marks the entries that changed between two checkpoints (m_i = 1 where
|θ1 − θ0| > atol in the comparison dtype). In memory and on disk each tensor's mask is its flattened boolean
array packed 8 entries per byte with ``numpy.packbits(..., bitorder="big")`` (entry 0 is the most significant
bit of byte 0; the unused bits of the last byte are zero), so a mask costs ~1 bit per parameter.

File format (``format = "rlsubnet.mask"``, ``format_version = 1``): a safetensors file holding one 1-D uint8
tensor per checkpoint tensor, under the checkpoint tensor's own name, plus these ``__metadata__`` strings:

===================  =================================================================================
``format``           ``rlsubnet.mask``
``format_version``   ``1``
``rlsubnet_version`` version that wrote the file
``kind``             ``changed`` (built from a pair), ``random`` (a baseline) or ``union`` /
                     ``intersection`` / ``difference`` (combined)
``atol``             JSON number (null for a combination of masks at different tolerances)
``dtype``            comparison mode the changed-test ran in: ``bf16`` / ``fp32`` / ``native`` (JSON)
``density``          changed / numel over all tensors (repr of a float)
``numel``            parameters covered; ``changed``: entries set
``bitorder``         ``big``
``tensors``          JSON object, in file order: name -> {"shape": [...], "changed": n}
``base``, ``tuned``  JSON identity of each checkpoint (see :func:`rlsubnet.masks.build.checkpoint_identity`)
``extra``            JSON: everything else (random-mask settings, operands of a combination, skipped tensors)
``bits_sha256``      SHA-256 over (name, shape, packed bytes) of every tensor: any flipped bit is detected
===================  =================================================================================

Loading checks everything: format, dtype and length of every packed tensor, zero padding bits, the recorded
per-tensor counts and the checksum, so a corrupt or truncated mask file is an error, never a silently
different mask.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from rlsubnet._version import __version__
from rlsubnet.diff.names import MODULE_KINDS, layer_of, module_kind
from rlsubnet.errors import MismatchError, RlsubnetError
from rlsubnet.errors import listing as _listing
from rlsubnet.fileio import locks_output

FORMAT = "rlsubnet.mask"
FORMAT_VERSION = 1
BITORDER = "big"
# Bits set in each byte value: popcount without unpacking.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class MaskError(RlsubnetError):
    """A mask file cannot be read or trusted, or a mask cannot be used as asked."""


class MaskMismatchError(MaskError, MismatchError):
    """Two masks, or a mask and a model, cover different tensors or shapes."""


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def popcount(packed: np.ndarray) -> int:
    """Number of set bits in a packed uint8 array (chunked: no full-size temporary)."""
    total = 0
    step = 1 << 24
    for i in range(0, packed.size, step):
        total += int(_POPCOUNT[packed[i : i + step]].sum(dtype=np.int64))
    return total


def pack_bool(flags: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack a boolean array (any shape, flattened in C order) into bytes, big bit order."""
    if isinstance(flags, torch.Tensor):
        flags = flags.detach().cpu().reshape(-1).to(torch.bool).numpy()
    return np.packbits(np.asarray(flags, dtype=bool).reshape(-1), bitorder=BITORDER)


def unpack_bool(packed: np.ndarray, numel: int) -> np.ndarray:
    return np.unpackbits(packed, count=numel, bitorder=BITORDER).view(bool)


def _pad_bits_clear(packed: np.ndarray, numel: int) -> bool:
    rem = numel % 8
    if rem == 0 or packed.size == 0:
        return True
    return int(packed[-1]) & ((1 << (8 - rem)) - 1) == 0


def group_density(records: Iterable[dict], key: str) -> list[dict]:
    """Pool per-tensor records ({name, layer, module, numel, changed}) by ``key``; numel-weighted density."""
    groups: dict[object, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in records:
        g = groups[r[key]]
        g[0] += 1
        g[1] += r["numel"]
        g[2] += r["changed"]
    if key == "layer":
        order = sorted(groups, key=lambda k: (k is None, k if k is not None else 0))
    else:
        order = [k for k in MODULE_KINDS if k in groups] + [k for k in groups if k not in MODULE_KINDS]
    return [
        {key: k, "n_tensors": groups[k][0], "numel": groups[k][1], "changed": groups[k][2],
         "density": groups[k][2] / groups[k][1] if groups[k][1] else 0.0}
        for k in order
    ]


class Mask:
    """A bit-packed boolean mask per tensor, plus metadata.

    >>> m = rlsubnet.masks.build_mask("base/", "grpo/", atol=1e-5)
    >>> m.density, m.tensor("model.layers.0.mlp.up_proj.weight").shape
    >>> (m & other).save("both.safetensors"); Mask.load("both.safetensors")

    ``meta`` holds ``kind``, ``atol``, ``dtype``, ``base``, ``tuned`` and ``extra`` (see the module docstring).
    """

    def __init__(self, shapes: Mapping[str, Iterable[int]], packed: Mapping[str, np.ndarray], meta: Mapping | None = None):
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
        if set(packed) != set(self._shapes):
            raise MaskError("mask tensors and shapes name different tensors")
        self._packed: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        for name, shape in self._shapes.items():
            bits = np.ascontiguousarray(packed[name])
            numel = math.prod(shape)
            if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != packed_size(numel):
                raise MaskError(
                    f"mask tensor {name!r}: expected {packed_size(numel)} packed bytes (uint8, 1-D) for shape "
                    f"{list(shape)}, got {bits.dtype} {list(bits.shape)}"
                )
            if not _pad_bits_clear(bits, numel):
                raise MaskError(f"mask tensor {name!r}: padding bits past entry {numel} are set")
            self._packed[name] = bits
            self._counts[name] = popcount(bits)
        meta = dict(meta or {})
        meta.setdefault("kind", "changed")
        meta.setdefault("atol", None)
        meta.setdefault("dtype", None)
        meta.setdefault("base", None)
        meta.setdefault("tuned", None)
        meta.setdefault("extra", {})
        self.meta = meta

    # -- construction
    @classmethod
    def from_bool(cls, tensors: Mapping[str, torch.Tensor | np.ndarray], meta: Mapping | None = None) -> "Mask":
        """A mask from boolean tensors (True = in the mask), keeping their names and shapes."""
        shapes, packed = {}, {}
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor):
                if t.dtype != torch.bool:
                    raise MaskError(f"tensor {name!r} is {t.dtype}, not bool")
                shapes[name] = tuple(t.shape)
            else:
                t = np.asarray(t)
                if t.dtype != bool:
                    raise MaskError(f"array {name!r} is {t.dtype}, not bool")
                shapes[name] = tuple(t.shape)
            packed[name] = pack_bool(t)
        return cls(shapes, packed, meta)

    @classmethod
    def full(cls, shapes: Mapping[str, Iterable[int]], value: bool, meta: Mapping | None = None) -> "Mask":
        """All-ones (``value=True``) or all-zeros mask over ``shapes``."""
        packed = {}
        for name, shape in shapes.items():
            numel = math.prod(tuple(shape))
            packed[name] = pack_bool(np.full(numel, value, dtype=bool))
        return cls(shapes, packed, {"kind": "ones" if value else "zeros", **(meta or {})})

    # -- what is inside
    def names(self) -> list[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check_name(name)]

    def packed(self, name: str) -> np.ndarray:
        """The packed bytes of one tensor (read-only view)."""
        v = self._packed[self._check_name(name)].view()
        v.flags.writeable = False
        return v

    def _check_name(self, name: str) -> str:
        if name not in self._shapes:
            raise MaskError(f"the mask has no tensor named {name!r}")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self._shapes.values())

    @property
    def changed(self) -> int:
        """Entries in the mask (|m|)."""
        return sum(self._counts.values())

    def count(self, name: str) -> int:
        return self._counts[self._check_name(name)]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def density(self) -> float:
        """|m| / n over every tensor (numel-weighted): the paper's density of the update."""
        n = self.numel
        return self.changed / n if n else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def atol(self) -> float | None:
        return self.meta.get("atol")

    @property
    def dtype(self) -> str | None:
        return self.meta.get("dtype")

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "changed")

    def numpy(self, name: str) -> np.ndarray:
        """Unpacked boolean array of one tensor, in its shape."""
        shape = self.shape(name)
        return unpack_bool(self._packed[name], math.prod(shape)).reshape(shape)

    def tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Unpacked ``torch.bool`` tensor of one tensor, in its shape (1 byte per entry)."""
        t = torch.from_numpy(self.numpy(name))
        return t.to(device) if device is not None else t

    def flat_block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Unpacked booleans of flat entries [start, stop); ``start`` must be a multiple of 8."""
        if start % 8:
            raise ValueError("start must be a multiple of 8")
        numel = math.prod(self.shape(name))
        stop = min(stop, numel)
        return unpack_bool(self._packed[name][start // 8 : packed_size(stop)], stop - start)

    # -- breakdowns
    def per_tensor(self) -> list[dict]:
        """One record per tensor: name, layer, module, shape, numel, changed, density."""
        out = []
        for name, shape in self._shapes.items():
            numel = math.prod(shape)
            c = self._counts[name]
            out.append({
                "name": name, "layer": layer_of(name), "module": module_kind(name), "shape": list(shape),
                "numel": numel, "changed": c, "density": c / numel if numel else 0.0,
            })
        return out

    def layers(self) -> list[dict]:
        """Density per transformer block (layer None = tensors outside the blocks)."""
        return group_density(self.per_tensor(), "layer")

    def modules(self) -> list[dict]:
        """Density per module kind (q, k, v, o, gate, up, down, embed, lm_head, norm, ...)."""
        return group_density(self.per_tensor(), "module")

    def summary(self) -> dict:
        """Headline figures and provenance (what ``rlsubnet mask --json`` prints)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rlsubnet_version": self.meta.get("rlsubnet_version", __version__),
            "kind": self.kind,
            "atol": self.atol,
            "dtype": self.dtype,
            "numel": self.numel,
            "changed": self.changed,
            "density": self.density,
            "sparsity": self.sparsity,
            "n_tensors": len(self),
            "base": self.meta.get("base"),
            "tuned": self.meta.get("tuned"),
            "extra": self.meta.get("extra", {}),
            "bits_sha256": self.bits_sha256(),
            "layers": self.layers(),
            "modules": self.modules(),
        }

    # -- comparisons and combinations
    def check_same_layout(self, other: "Mask", what: str = "combine") -> None:
        """Raise :class:`MaskMismatchError` unless both masks cover the same tensor names and shapes."""
        mine, theirs = self._shapes, other._shapes
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        reshaped = [f"{n} {list(mine[n])} vs {list(theirs[n])}" for n in mine if n in theirs and mine[n] != theirs[n]]
        if missing or extra or reshaped:
            parts = []
            if missing:
                parts.append(f"{len(missing)} only in the first: {_listing(missing)}")
            if extra:
                parts.append(f"{len(extra)} only in the second: {_listing(extra)}")
            if reshaped:
                parts.append(f"{len(reshaped)} with different shapes: {_listing(reshaped)}")
            raise MaskMismatchError(f"cannot {what} masks over different tensors ({'; '.join(parts)})")

    def _combine(self, other: "Mask", op: str) -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        self.check_same_layout(other, op)
        fn = {"union": np.bitwise_or, "intersection": np.bitwise_and,
              "difference": lambda a, b: np.bitwise_and(a, np.bitwise_not(b))}[op]
        packed = {n: fn(self._packed[n], other._packed[n]) for n in self._shapes}
        same = lambda key: self.meta.get(key) if self.meta.get(key) == other.meta.get(key) else None  # noqa: E731
        meta = {
            "kind": op,
            "atol": same("atol"),
            "dtype": same("dtype"),
            "base": same("base"),
            "tuned": None,
            "extra": {"operands": [operand_summary(self), operand_summary(other)]},
        }
        return Mask(self._shapes, packed, meta)

    def union(self, other: "Mask") -> "Mask":
        return self._combine(other, "union")

    def intersection(self, other: "Mask") -> "Mask":
        return self._combine(other, "intersection")

    def difference(self, other: "Mask") -> "Mask":
        """Entries in this mask and not in ``other``."""
        return self._combine(other, "difference")

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def complement(self) -> "Mask":
        """Entries not in this mask (the frozen set when this mask is trained)."""
        packed = {}
        for n, shape in self._shapes.items():
            bits = np.bitwise_not(self._packed[n])
            rem = math.prod(shape) % 8
            if rem and bits.size:
                bits[-1] &= (0xFF << (8 - rem)) & 0xFF
            packed[n] = bits
        meta = {**self.meta, "kind": "complement", "tuned": None, "extra": {"operands": [operand_summary(self)]}}
        return Mask(self._shapes, packed, meta)

    def intersection_count(self, other: "Mask", name: str | None = None) -> int:
        """|A ∩ B| over every tensor (or one tensor), without unpacking."""
        self.check_same_layout(other, "intersect")
        names = [name] if name is not None else self.names()
        return sum(popcount(np.bitwise_and(self._packed[n], other._packed[n])) for n in names)

    def same_bits(self, other: "Mask") -> bool:
        if self._shapes != other._shapes:
            return False
        return all(np.array_equal(self._packed[n], other._packed[n]) for n in self._shapes)

    def bits_sha256(self) -> str:
        h = hashlib.sha256()
        for name, shape in self._shapes.items():
            h.update(name.encode("utf-8") + b"\0" + json.dumps(list(shape)).encode() + b"\0")
            h.update(memoryview(self._packed[name]))
        return h.hexdigest()

    # -- files
    def file_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` strings this mask is saved with (deterministic: no timestamps)."""
        dump = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"))  # noqa: E731
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "rlsubnet_version": __version__,
            "kind": str(self.kind),
            "atol": dump(self.atol),
            "dtype": dump(self.dtype),
            "density": repr(self.density),
            "numel": str(self.numel),
            "changed": str(self.changed),
            "bitorder": BITORDER,
            "tensors": json.dumps(
                {n: {"shape": list(s), "changed": self._counts[n]} for n, s in self._shapes.items()},
                separators=(",", ":"),
            ),
            "base": dump(self.meta.get("base")),
            "tuned": dump(self.meta.get("tuned")),
            "extra": dump(self.meta.get("extra", {})),
            "bits_sha256": self.bits_sha256(),
        }

    @locks_output("path")
    def save(self, path: str | Path) -> Path:
        """Write the mask atomically as a safetensors file (see the module docstring for the format)."""
        from rlsubnet.checkpoint.writer import SafetensorsWriter

        path = Path(path)
        specs = [(n, torch.uint8, (packed_size(math.prod(s)),)) for n, s in self._shapes.items()]
        with SafetensorsWriter(path, specs, self.file_metadata()) as w:
            for n in self._shapes:
                w.write(n, torch.from_numpy(self._packed[n]))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        """Read and verify a mask file; any inconsistency raises :class:`MaskError` naming the file."""
        from rlsubnet.checkpoint.index import read_safetensors_header
        from rlsubnet.checkpoint.reader import SafetensorsCheckpoint
        from rlsubnet.errors import CheckpointError

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
                f"{path}: corrupt mask: metadata and stored tensors differ (not stored: {_listing(missing) or '-'}; "
                f"not described: {_listing(extra) or '-'})"
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
        try:
            mask = cls(shapes, packed, meta)
        except MaskError as exc:
            raise MaskError(f"{path}: corrupt mask: {exc}") from None
        bad = [n for n in shapes if mask._counts[n] != counts[n]]
        if bad:
            n = bad[0]
            raise MaskError(
                f"{path}: corrupt mask: tensor {n!r} has {mask._counts[n]} bits set but the metadata records "
                f"{counts[n]}" + (f" ({len(bad) - 1} more tensors disagree)" if len(bad) > 1 else "")
            )
        if "bits_sha256" not in md:
            raise MaskError(f"{path}: corrupt mask metadata (no bits_sha256 checksum)")
        if md["bits_sha256"] != mask.bits_sha256():
            raise MaskError(f"{path}: corrupt mask: checksum of the packed bits does not match bits_sha256")
        mask.meta["path"] = str(path)
        return mask

    def __repr__(self) -> str:
        atol = "-" if self.atol is None else f"{self.atol:g}"
        return (f"Mask({self.kind}, {len(self)} tensors, {self.changed:,}/{self.numel:,} entries, "
                f"density {self.density:.4f}, atol {atol}, dtype {self.dtype})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self.same_bits(other)

    __hash__ = None  # mutable metadata; masks are compared by bits


def _dim(v: object) -> int:
    # A dimension or a count: a non-negative JSON integer (not 1.5, not true, not -5).
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _check_meta_types(meta: dict) -> None:
    # The checksum covers the bits only: a metadata field of the wrong type must fail here, not deep in a report.
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


def operand_summary(mask: Mask) -> dict:
    """How a mask is cited inside another mask's metadata (combinations, random baselines)."""
    return {
        "kind": mask.kind,
        "path": mask.meta.get("path"),
        "atol": mask.atol,
        "dtype": mask.dtype,
        "density": mask.density,
        "changed": mask.changed,
        "bits_sha256": mask.bits_sha256(),
    }


def load_mask(path: str | Path) -> Mask:
    return Mask.load(path)


def as_mask(spec: "Mask | str | Path | Mapping[str, torch.Tensor]") -> Mask:
    """A Mask object; a mask file path (loaded and verified); or name -> bool tensor (True = in the mask)."""
    if isinstance(spec, Mask):
        return spec
    if isinstance(spec, (str, Path)):
        return Mask.load(spec)
    if isinstance(spec, Mapping):
        return Mask.from_bool(spec, {"kind": "given"})
    raise MaskError(f"expected a Mask, a mask file path or a dict of bool tensors, got {type(spec).__name__}")
