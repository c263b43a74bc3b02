"""Write safetensors checkpoints, streaming and atomically.

:class:`SafetensorsWriter` writes the header first (it needs every name, dtype and shape up front) and then
each tensor's bytes in header order, so a checkpoint of any size is written with one tensor in memory.
Files are written under a temporary name and renamed into place; :func:`atomic_dir` does the same for a
whole output folder, so an interrupted run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from rlsubnet.checkpoint.index import TORCH_TO_ST, element_size
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_write_text
from rlsubnet.staged import StagedFile

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (a view when it is already contiguous)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SafetensorsWriter(StagedFile):
    """Stream tensors into one safetensors file, in the order of ``specs``.

    >>> with SafetensorsWriter(path, [("w", torch.bfloat16, (2, 2))]) as w:
    ...     w.write("w", tensor)
    """

    def __init__(
        self,
        path: str | Path,
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        direct: bool = False,
    ):
        """``direct``: write with O_DIRECT, bypassing the page cache (see :class:`rlsubnet.staged.DirectFile`)."""
        self.path = Path(path)
        self.specs = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in specs]
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self.specs:
            # The header is a JSON object keyed by name: a repeated name or "__metadata__" would overwrite an
            # entry, and a name UTF-8 cannot encode makes a header no reader accepts.
            if name in header or name == "__metadata__" or not _utf8(name):
                what = "repeated" if name in header and name != "__metadata__" else "not storable in safetensors"
                raise UsageError(f"{self.path}: tensor name {name!r} is {what}")
            if dtype not in TORCH_TO_ST:
                raise UsageError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {
                "dtype": TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
        super().__init__(self.path, direct=direct)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise UsageError(f"{self.path}: tensor {name!r} was not declared")
        exp_name, dtype, shape = self.specs[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise UsageError(
                f"{self.path}: expected tensor {exp_name!r} {dtype}{list(shape)} next, "
                f"got {name!r} {tensor.dtype}{list(tensor.shape)}"
            )
        self._f.write(tensor_bytes(tensor))
        self._next += 1

    def write_part(self, tensor_part) -> None:
        """Append raw elements of the current tensor (for tensors written in blocks); call :meth:`end_tensor`.

        ``tensor_part``: a tensor, or a contiguous numpy array / bytes-like object of its raw bytes."""
        self._f.write(tensor_bytes(tensor_part) if isinstance(tensor_part, torch.Tensor) else tensor_part)

    def end_tensor(self, name: str) -> None:
        exp_name, dtype, shape = self.specs[self._next]
        if name != exp_name:
            raise UsageError(f"{self.path}: expected tensor {exp_name!r} next, got {name!r}")
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place; fails if a declared tensor was never written."""
        if self._next != len(self.specs):
            self.abort()
            raise UsageError(f"{self.path}: only {self._next} of {len(self.specs)} tensors were written")
        self._commit()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * element_size(spec[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return [s for s in shards if s] or [[]]


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(
    out_dir: str | Path,
    layout: list[tuple[str, list[TensorSpec]]],
    get_tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a (sharded) Hugging Face style checkpoint into ``out_dir``, one tensor at a time.

    ``layout`` lists (file name, specs) per shard; an index.json is written when there is more than one file.
    ``get_tensor(name)`` is called once per tensor, in layout order.
    """
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, specs in layout:
        with SafetensorsWriter(out_dir / file_name, specs, metadata) as writer:
            for name, _, _ in specs:
                writer.write(name, get_tensor(name))
                weight_map[name] = file_name
        total += sum(math.prod(s) * element_size(d) for _, d, s in specs)
    if len(layout) > 1:
        index = {"metadata": {"total_size": total, **(dict(metadata) if metadata else {})}, "weight_map": weight_map}
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def save_state_dict(
    tensors: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save in-memory tensors as a Hugging Face style checkpoint folder, sharded when ``max_shard_bytes`` is set.

    Tensors that share storage (tied weights) are saved once each, as separate copies.
    """
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(specs, max_shard_bytes) if max_shard_bytes else [specs]
    names = shard_file_names(len(shards))
    write_checkpoint(out_dir, list(zip(names, shards)), lambda n: tensors[n], metadata)
    return Path(out_dir)
