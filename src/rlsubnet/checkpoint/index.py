"""What a checkpoint holds, read from file headers only: names, dtypes, shapes and byte ranges.

A safetensors file is an 8-byte little-endian header length, a JSON header, then one byte buffer; each header
entry gives a tensor's dtype, shape and ``data_offsets`` into that buffer. Parsing the header costs a few KB of
reading whatever the model size, so the whole index of a 70B checkpoint is built without touching its weights.
Every inconsistency (bad JSON, unknown dtype, offsets past the end of a truncated file) is reported here,
naming the file and tensor, before any statistics are computed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsubnet.errors import CheckpointError
from rlsubnet.fileio import safe_member_name

# safetensors dtype codes -> torch dtypes. Sizes come from torch itself.
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

# A header larger than this is not a real checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
INDEX_NAMES = ("model.safetensors.index.json",)


def dtype_name(dtype: torch.dtype) -> str:
    """Short, stable name of a torch dtype for reports: 'bfloat16', 'float32', ..."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize  # no tensor allocation: this is called per block in streaming loops


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte position of its data in ``file``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; a header naming a tensor twice is ambiguous, not valid.
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _not_utf8(header: dict) -> str | None:
    """A name or metadata string of a parsed header that UTF-8 cannot encode, or None. JSON's \\ud800 escapes
    decode to lone surrogates, which the safetensors library refuses and no file name or writer can hold."""
    metadata = header.get("__metadata__")
    strings = [*header, *(metadata.items() if isinstance(metadata, dict) else ())]
    for s in strings:
        for v in s if isinstance(s, tuple) else (s,):
            if isinstance(v, str) and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return v
    return None


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its tensors (in data order) and metadata."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {file_size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len}, file size {file_size})"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (key {exc.args[0]!r} appears twice)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also a number too long for int()
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    bad = _not_utf8(header)
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt safetensors header ({bad!r} is not valid UTF-8)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    data_size = file_size - data_start
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            st_dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            # Integers only (bool is an int to Python, and 1.5 must not pass as 1), as safetensors itself insists.
            if not isinstance(shape, list) or not all(_is_int(v) for v in (*shape, begin, end)):
                raise TypeError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not isinstance(st_dtype, str) or st_dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype!r}")
        dtype = ST_DTYPES[st_dtype]
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        expected = math.prod(shape) * element_size(dtype)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} header says {end - begin} bytes, but {st_dtype}{list(shape)} needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} of a {file_size}-byte file"
            )
        infos.append(TensorInfo(name, dtype, shape, path, data_start + begin, end - begin))
    infos.sort(key=lambda i: i.offset)
    for prev, cur in zip(infos, infos[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise CheckpointError(f"{path}: corrupt header: tensors {prev.name!r} and {cur.name!r} overlap")
    return {i.name: i for i in infos}, {str(k): str(v) for k, v in metadata.items()}


def read_index_json(index_path: Path) -> dict[str, Path]:
    """weight_map of a sharded checkpoint: tensor name -> shard path. Every named shard must exist.

    A shard is named by a plain file name in the index's folder: a name with a separator, ``..`` or an
    absolute path would read a file elsewhere, and is refused. (A shard that is a symlink is followed: the
    hub cache links every file of a snapshot to its blob.)
    """
    index_path = Path(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"{index_path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also a number too long for int()
        raise CheckpointError(f"{index_path}: corrupt index ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{index_path}: corrupt index (nested too deeply)") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: corrupt index (no weight_map)")
    folder = index_path.parent
    out: dict[str, Path] = {}
    missing: set[str] = set()
    for name, shard in weight_map.items():
        shard_path = folder / safe_member_name(shard, f"{index_path}: shard of tensor {name!r}", CheckpointError)
        if not shard_path.is_file():
            missing.add(str(shard))
        out[str(name)] = shard_path
    if missing:
        raise CheckpointError(f"{index_path}: names missing shard file(s): {', '.join(sorted(missing))}")
    return out


def index_safetensors_files(files: list[Path], weight_map: dict[str, Path] | None = None) -> dict[str, TensorInfo]:
    """Index several safetensors files as one checkpoint, in file then offset order.

    With a ``weight_map`` (from an index.json), every mapped tensor must be in the shard the map names.
    A tensor found in two files is an error: we cannot know which one a loader would use.
    """
    infos: dict[str, TensorInfo] = {}
    for file in files:
        header, _ = read_safetensors_header(file)
        for name, info in header.items():
            if name in infos:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {infos[name].file} and in {file}")
            infos[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            held = infos.get(name)
            if held is None or os.path.realpath(held.file) != os.path.realpath(shard):
                raise CheckpointError(f"{shard}: the index lists tensor {name!r} in this shard, but it is not there")
    return infos
