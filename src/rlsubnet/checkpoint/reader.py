"""Read tensors from a checkpoint one at a time, or in flat element blocks, with one shard open at a time.

Reading goes through ``os.preadv`` straight into a fresh torch buffer: one copy from the page cache, no mmap
left behind, and the buffer is freed as soon as the caller drops it. Memory is therefore bounded by what the
caller holds (a block, or the largest tensor), never by the model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from rlsubnet.checkpoint.index import TensorInfo, element_size, index_safetensors_files, read_index_json
from rlsubnet.errors import CheckpointError


class Checkpoint:
    """A read-only collection of named tensors.

    ``source`` is what the user passed (path, hub id, or a label), ``location`` the resolved path.
    Subclasses implement :meth:`read_flat`; everything else is shared.
    """

    format: str = "?"
    can_clone: bool = False  # see clone()

    def __init__(self, source: str, location: str, infos: Mapping[str, TensorInfo]):
        self.source = source
        self.location = location
        self.infos: dict[str, TensorInfo] = dict(infos)

    # -- what is inside
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, then by offset): the order that reads fastest."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.location}: no tensor named {name!r}") from None

    @property
    def numel(self) -> int:
        return sum(i.numel for i in self.infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i.numel * element_size(i.dtype) for i in self.infos.values())

    # -- reading
    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a new 1-D tensor in its stored dtype."""
        raise NotImplementedError

    def read_flat_into(self, name: str, start: int, stop: int, out) -> memoryview:
        """Read elements [start, stop) of the flattened tensor into ``out`` (a writable buffer, e.g. a uint8
        numpy array, of at least that many bytes) and return the filled part, as bytes.

        For callers that reuse their buffers: safetensors checkpoints read straight into ``out``; the others
        copy from :meth:`read_flat`.
        """
        t = self.read_flat(name, start, stop).reshape(-1)
        dst = memoryview(out).cast("B")[: t.numel() * t.element_size()]
        if len(dst):
            dst[:] = t.view(torch.uint8).numpy().data
        return dst

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_flat(name, 0, info.numel).reshape(info.shape)

    def iter_blocks(self, name: str, block_numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, flat block) pairs covering the tensor, each at most ``block_numel`` elements."""
        numel = self.info(name).numel
        for start in range(0, numel, max(1, block_numel)):
            yield start, self.read_flat(name, start, min(numel, start + block_numel))

    def clone(self) -> Checkpoint:
        """A reader over the same tensors that another thread may use while this one is in use.

        A reader is not safe to share between threads (it may keep one file open and switch it on demand);
        a clone has its own handle and shares only the read-only index. Close it when done. Only classes
        with ``can_clone`` support it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be cloned")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {len(self.infos)} tensors)"


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded Hugging Face checkpoint, or a single file)."""

    format = "safetensors"
    can_clone = True

    def __init__(self, source: str, location: str, files: list[Path], weight_map: dict[str, Path] | None = None):
        super().__init__(source, location, index_safetensors_files(files, weight_map))
        self.files = list(files)
        self._fd: int | None = None
        self._fd_path: Path | None = None

    def _open(self, path: Path) -> int:
        # Keep at most one shard open: switching shards closes the previous one.
        if self._fd_path != path:
            self.close()
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
            self._fd_path = path
        assert self._fd is not None
        return self._fd

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.info(name)
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"{name}: element range [{start}, {stop}) outside 0..{info.numel}")
        buf = torch.empty((stop - start) * element_size(info.dtype), dtype=torch.uint8)
        self._pread(info, start, stop, buf.numpy().data)
        return buf.view(info.dtype)

    def read_flat_into(self, name: str, start: int, stop: int, out) -> memoryview:
        info = self.info(name)
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"{name}: element range [{start}, {stop}) outside 0..{info.numel}")
        dst = memoryview(out).cast("B")
        nbytes = (stop - start) * element_size(info.dtype)
        if len(dst) < nbytes:
            raise ValueError(f"{name}: a {len(dst)}-byte buffer cannot hold elements [{start}, {stop})")
        dst = dst[:nbytes]
        self._pread(info, start, stop, dst)
        return dst

    def _pread(self, info: TensorInfo, start: int, stop: int, view: memoryview) -> None:
        """Fill ``view`` with elements [start, stop) of ``info``'s tensor, straight from the file."""
        esize = element_size(info.dtype)
        nbytes = (stop - start) * esize
        if not nbytes:
            return
        fd = self._open(info.file)
        pos, done = info.offset + start * esize, 0
        try:
            while done < nbytes:
                got = os.preadv(fd, [view[done:nbytes]], pos + done)
                if got == 0:
                    raise CheckpointError(
                        f"{info.file}: truncated while reading tensor {info.name!r} (file changed after indexing?)"
                    )
                done += got
        except OSError as exc:
            raise CheckpointError(f"{info.file}: read error in tensor {info.name!r} ({exc.strerror or exc})") from None

    def clone(self) -> SafetensorsCheckpoint:
        other = copy.copy(self)  # shares the index (read-only); opens its own descriptors on demand
        other._fd, other._fd_path = None, None
        return other

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._fd_path = None


class StateDictCheckpoint(Checkpoint):
    """Tensors already in memory (a state dict or a module), for the Python API and the lab."""

    format = "memory"
    can_clone = True

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<state dict>"):
        infos = {}
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{label}: entry {name!r} is not a tensor ({type(t).__name__})")
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            self._tensors[name] = t
            infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(label), -1, t.numel() * t.element_size())
        super().__init__(label, label, infos)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.info(name)
        return self._tensors[name].reshape(-1)[start:stop].clone()

    def read_flat_into(self, name: str, start: int, stop: int, out) -> memoryview:
        self.info(name)
        src = self._tensors[name].reshape(-1)[start:stop]  # one copy, straight into ``out``
        dst = memoryview(out).cast("B")[: src.numel() * src.element_size()]
        if len(dst):
            dst[:] = src.view(torch.uint8).numpy().data
        return dst

    def clone(self) -> StateDictCheckpoint:
        return self  # reads only slice and copy tensors in memory: safe from any thread


class PickleCheckpoint(Checkpoint):
    """PyTorch pickle files (``.bin``/``.pt``), loaded with ``weights_only=True`` and memory-mapped when possible.

    Only one shard's state dict is held at a time. Pickle can run code, so callers must opt in.
    """

    format = "pickle"
    can_clone = True

    def __init__(self, source: str, location: str, files: list[Path]):
        self.files = list(files)
        self._loaded_path: Path | None = None
        self._loaded: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, t in self._load(file).items():
                if name in infos:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {infos[name].file} and in {file}")
                infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, -1, t.numel() * t.element_size())
        super().__init__(source, location, infos)

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._loaded_path == file:
            return self._loaded
        self._loaded, self._loaded_path = {}, None
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be memory-mapped
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{file}: cannot load as a weights-only PyTorch checkpoint ({first_line})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{file}: not a flat state dict of tensors")
        self._loaded, self._loaded_path = obj, file
        return obj

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.info(name)
        return self._load(info.file)[name].reshape(-1)[start:stop].clone()

    def clone(self) -> PickleCheckpoint:
        other = copy.copy(self)  # shares the index; loads (memory-maps) shards on its own
        other._loaded, other._loaded_path = {}, None
        return other

    def close(self) -> None:
        self._loaded, self._loaded_path = {}, None


def safetensors_files_in(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a Hugging Face model folder, and its weight_map if sharded."""
    for index_name in ("model.safetensors.index.json",):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_index_json(index_path)
            files = sorted(set(weight_map.values()), key=lambda p: p.name)
            return files, weight_map
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], None
    return sorted(folder.glob("*.safetensors")), None
