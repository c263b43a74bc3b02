"""The mask artifact: one bit per parameter, packed, with the metadata that says what the bits mean.

A mask m marks the entries that changed between two checkpoints (m_i = 1 where
|θ1 − θ0| > atol in the comparison dtype). In memory and on disk each tensor's mask is its flattened boolean
array packed 8 entries per byte with ``numpy.packbits(..., bitorder="big")`` (entry 0 is the most significant
bit of byte 0; the unused bits of the last byte are zero), so a mask costs ~1 bit per parameter.

The file format and its checks: :mod:`rlsubnet.masks.io`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from rlsubnet._version import __version__
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.diff.names import grouped, layer_of, module_kind
from rlsubnet.fileio import locks_output
from rlsubnet.masks.errors import MaskError, MaskMismatchError
from rlsubnet.masks.io import (
    FORMAT,
    FORMAT_VERSION,
    check_metadata_sha256,
    pack_bool,
    packed_size,
    pad_bits_clear,
    popcount,
    read_mask_file,
    unpack_bool,
    write_mask_file,
)

RECORD_KEYS = ("kind", "path", "atol", "dtype", "density", "changed", "bits_sha256", "base", "tuned")
OPERAND = ("kind", "path", "atol", "dtype", "density", "changed", "bits_sha256")  # inside a combination's metadata


def group_density(records: Iterable[dict], key: str) -> list[dict]:
    """Pool per-tensor records ({name, layer, module, numel, changed}) by ``key`` ("layer" or "module");
    numel-weighted density."""
    rows = []
    for k, group in grouped(records, lambda r: r[key], key):
        numel, changed = sum(r["numel"] for r in group), sum(r["changed"] for r in group)
        rows.append(
            {
                key: k,
                "n_tensors": len(group),
                "numel": numel,
                "changed": changed,
                "density": changed / numel if numel else 0.0,
            }
        )
    return rows


class Mask:
    """A bit-packed boolean mask per tensor, plus metadata.

    >>> m = rlsubnet.masks.build_mask("base/", "grpo/", atol=1e-5)
    >>> m.density, m.tensor("model.layers.0.mlp.up_proj.weight").shape
    >>> (m & other).save("both.safetensors"); Mask.load("both.safetensors")

    ``meta`` holds ``kind``, ``atol``, ``dtype`` (the comparison mode, :attr:`mode`), ``base``, ``tuned`` and
    ``extra`` (see the module docstring).
    """

    def __init__(
        self, shapes: Mapping[str, Iterable[int]], packed: Mapping[str, np.ndarray], meta: Mapping | None = None
    ):
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
        if set(packed) != set(self._shapes):
            raise MaskError("mask tensors and shapes name different tensors")
        self._packed: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        for name, shape in self._shapes.items():
            try:
                name.encode("utf-8")  # it goes into the checksum and the file's header
            except (AttributeError, UnicodeEncodeError):
                raise MaskError(f"mask tensor name {name!r} is not a valid UTF-8 string") from None
            bits = np.ascontiguousarray(packed[name])
            numel = math.prod(shape)
            if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != packed_size(numel):
                raise MaskError(
                    f"mask tensor {name!r}: expected {packed_size(numel)} packed bytes (uint8, 1-D) for shape "
                    f"{list(shape)}, got {bits.dtype} {list(bits.shape)}"
                )
            if not pad_bits_clear(bits, numel):
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
    def from_bool(cls, tensors: Mapping[str, torch.Tensor | np.ndarray], meta: Mapping | None = None) -> Mask:
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
    def full(cls, shapes: Mapping[str, Iterable[int]], value: bool, meta: Mapping | None = None) -> Mask:
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
    def mode(self) -> str | None:
        """The comparison mode the mask was built in (``bf16``, ``fp32``, ``native``; None when not built)."""
        return self.meta.get("dtype")

    @property
    def dtype(self) -> str | None:
        """Deprecated name of :attr:`mode`, for callers written before the mode had its own name."""
        return self.mode

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
            out.append(
                {
                    "name": name,
                    "layer": layer_of(name),
                    "module": module_kind(name),
                    "shape": list(shape),
                    "numel": numel,
                    "changed": c,
                    "density": c / numel if numel else 0.0,
                }
            )
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
            "dtype": self.mode,
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
    def check_same_layout(self, other: Mask, what: str = "combine") -> None:
        """Raise :class:`MaskMismatchError` unless both masks cover the same tensor names and shapes."""
        diff = layout_diff(self._shapes, other._shapes, detail=lambda n, a, b: f"{n} {list(a)} vs {list(b)}")
        if diff:
            raise MaskMismatchError(
                f"cannot {what} masks over different tensors ({diff.describe('only in the first', 'only in the second')})"
            )

    def _combine(self, other: Mask, op: str) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        self.check_same_layout(other, op)
        ops: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
            "union": np.bitwise_or,
            "intersection": np.bitwise_and,
            "difference": lambda a, b: np.bitwise_and(a, np.bitwise_not(b)),
        }
        fn = ops[op]
        packed = {n: fn(self._packed[n], other._packed[n]) for n in self._shapes}
        same = lambda key: self.meta.get(key) if self.meta.get(key) == other.meta.get(key) else None  # noqa: E731
        meta = {
            "kind": op,
            "atol": same("atol"),
            "dtype": same("dtype"),
            "base": same("base"),
            "tuned": None,
            "extra": {"operands": [self.describe(OPERAND), other.describe(OPERAND)]},
        }
        return Mask(self._shapes, packed, meta)

    def union(self, other: Mask) -> Mask:
        return self._combine(other, "union")

    def intersection(self, other: Mask) -> Mask:
        return self._combine(other, "intersection")

    def difference(self, other: Mask) -> Mask:
        """Entries in this mask and not in ``other``."""
        return self._combine(other, "difference")

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def complement(self) -> Mask:
        """Entries not in this mask (the frozen set when this mask is trained)."""
        packed = {}
        for n, shape in self._shapes.items():
            bits = np.bitwise_not(self._packed[n])
            rem = math.prod(shape) % 8
            if rem and bits.size:
                bits[-1] &= (0xFF << (8 - rem)) & 0xFF
            packed[n] = bits
        meta = {**self.meta, "kind": "complement", "tuned": None, "extra": {"operands": [self.describe(OPERAND)]}}
        return Mask(self._shapes, packed, meta)

    def intersection_count(self, other: Mask, name: str | None = None) -> int:
        """|A ∩ B| over every tensor (or one tensor), without unpacking."""
        self.check_same_layout(other, "intersect")
        names = [name] if name is not None else self.names()
        return sum(popcount(np.bitwise_and(self._packed[n], other._packed[n])) for n in names)

    def same_bits(self, other: Mask) -> bool:
        if self._shapes != other._shapes:
            return False
        return all(np.array_equal(self._packed[n], other._packed[n]) for n in self._shapes)

    def describe(self, keys: Iterable[str] = RECORD_KEYS) -> dict:
        """How this mask is cited in other records: ``keys`` of :data:`RECORD_KEYS`, in that order ("base" and
        "tuned" are the checkpoints' sources; "dtype" is the comparison mode, under the key files use)."""
        values = {
            "kind": lambda: self.kind,
            "path": lambda: self.meta.get("path"),
            "atol": lambda: self.atol,
            "dtype": lambda: self.mode,
            "density": lambda: self.density,
            "changed": lambda: self.changed,
            "bits_sha256": self.bits_sha256,
            "base": lambda: (self.meta.get("base") or {}).get("source"),
            "tuned": lambda: (self.meta.get("tuned") or {}).get("source"),
        }
        return {k: values[k]() for k in keys}

    def bits_sha256(self) -> str:
        h = hashlib.sha256()
        for name, shape in self._shapes.items():
            h.update(name.encode("utf-8") + b"\0" + json.dumps(list(shape)).encode() + b"\0")
            h.update(self._packed[name].data)
        return h.hexdigest()

    # -- files
    @locks_output("path")
    def save(self, path: str | Path) -> Path:
        """Write the mask atomically as a safetensors file (format: :mod:`rlsubnet.masks.io`)."""
        return write_mask_file(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read and verify a mask file; any inconsistency raises :class:`MaskError` naming the file."""
        path = Path(path)
        shapes, packed, meta, counts, md = read_mask_file(path)
        checksum = md.get("bits_sha256")
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
        if checksum is None:
            raise MaskError(f"{path}: corrupt mask metadata (no bits_sha256 checksum)")
        if checksum != mask.bits_sha256():
            raise MaskError(f"{path}: corrupt mask: checksum of the packed bits does not match bits_sha256")
        # last, so that the checks above name what is wrong; this one sees what they cannot (a valid atol with a
        # digit changed, another kind or mode)
        check_metadata_sha256(path, md)
        mask.meta["path"] = str(path)
        return mask

    def __repr__(self) -> str:
        atol = "-" if self.atol is None else f"{self.atol:g}"
        return (
            f"Mask({self.kind}, {len(self)} tensors, {self.changed:,}/{self.numel:,} entries, "
            f"density {self.density:.4f}, atol {atol}, mode {self.mode})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self.same_bits(other)

    # mutable metadata; masks are compared by bits. typeshed types object.__hash__ as a method, so setting it
    # to None (the documented way to make a class unhashable) needs the ignore.
    __hash__ = None  # type: ignore[assignment]


def load_mask(path: str | Path) -> Mask:
    return Mask.load(path)


def as_mask(spec: Mask | str | Path | Mapping[str, torch.Tensor]) -> Mask:
    """A Mask object; a mask file path (loaded and verified); or name -> bool tensor (True = in the mask)."""
    if isinstance(spec, Mask):
        return spec
    if isinstance(spec, (str, Path)):
        return Mask.load(spec)
    if isinstance(spec, Mapping):
        return Mask.from_bool(spec, {"kind": "given"})
    raise MaskError(f"expected a Mask, a mask file path or a dict of bool tensors, got {type(spec).__name__}")
