"""How a checkpoint is laid out on disk (which tensor in which shard, file metadata), and the small non-weight
files of a model folder (config, tokenizer, generation config...).

Tools that rebuild a checkpoint "in the base's layout" read the layout here, then write shard by shard with
:class:`~rlsubnet.checkpoint.writer.SafetensorsWriter` and :func:`write_index`.
"""

from __future__ import annotations

import json
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from rlsubnet.checkpoint.index import INDEX_NAMES, read_safetensors_header
from rlsubnet.checkpoint.reader import Checkpoint, PickleCheckpoint, SafetensorsCheckpoint
from rlsubnet.checkpoint.writer import TensorSpec, shard_file_names
from rlsubnet.errors import CheckpointError
from rlsubnet.fileio import atomic_write_text, member_name_problem

# Files in a model folder that hold weights (or their index) rather than configuration.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".pkl")
WEIGHT_INDEX_SUFFIX = ".index.json"


@dataclass
class Layout:
    """Shard files in order, each with its tensors in storage order, plus the metadata to carry over."""

    files: list[tuple[str, list[TensorSpec]]]
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    index_metadata: dict = field(default_factory=dict)
    folder: Path | None = None  # the model folder, when the checkpoint is one

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1


def layout_of(ck: Checkpoint) -> Layout:
    """The shard layout of an open checkpoint.

    Safetensors checkpoints keep their file names and each file's ``__metadata__``; pickle shards map to
    safetensors shard names in the same grouping; in-memory checkpoints become one ``model.safetensors``.
    """
    groups: dict[Path, list[TensorSpec]] = {}
    for info in ck.infos.values():
        groups.setdefault(info.file, []).append((info.name, info.dtype, info.shape))
    folder = Path(ck.location) if Path(ck.location).is_dir() else None
    if isinstance(ck, SafetensorsCheckpoint):
        files, file_metadata = [], {}
        for path in ck.files:
            _, meta = read_safetensors_header(path)
            files.append((path.name, groups.get(path, [])))
            file_metadata[path.name] = meta
        index_metadata = {}
        if folder is not None:
            for index_name in INDEX_NAMES:
                if (folder / index_name).is_file():
                    index_metadata = _index_metadata(folder / index_name)
        return Layout(files, file_metadata, index_metadata, folder)
    if isinstance(ck, PickleCheckpoint):
        names = shard_file_names(len(ck.files))
        return Layout([(n, groups.get(p, [])) for n, p in zip(names, ck.files)], {}, {}, folder)
    specs = [(i.name, i.dtype, i.shape) for i in ck.infos.values()]
    return Layout([("model.safetensors", specs)], {}, {}, None)


def _index_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt index ({exc})") from None
    return dict(meta) if isinstance(meta, dict) else {}


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int, metadata: dict | None = None) -> None:
    """Write ``model.safetensors.index.json`` (metadata carried over, ``total_size`` recomputed)."""
    meta = {k: v for k, v in (metadata or {}).items() if k != "total_size"}
    index = {"metadata": {**meta, "total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(Path(out_dir) / INDEX_NAMES[0], json.dumps(index, indent=2) + "\n")


def is_weight_file(name: str) -> bool:
    """Weights or a weight index by its name; without case, as a case-insensitive file system sees it."""
    name = name.lower()
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEX_SUFFIX)


def aux_files(
    folder: Path, max_bytes: int, own: AbstractSet[str] = frozenset()
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The non-weight regular files at the top of a model folder, and the ones left out with the reason.

    Hidden files and ``own`` (the checkpoint's own weight and index files) are passed over; sub-folders,
    other weight-like files (``training_args.bin``, a second format's weights...), files over ``max_bytes``
    and names that are not plain portable file names (a backslash, a control character) are left out and listed, so the caller can record them rather than drop them silently.
    """
    kept: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        name = path.name
        if name.startswith(".") or name in own:
            continue
        problem = member_name_problem(name)
        if problem is not None:  # a patch would carry it under a name its readers refuse
            skipped.append((name, f"name {problem}"))
        elif path.is_dir():
            skipped.append((name + "/", "sub-folder"))
        elif not path.is_file():
            skipped.append((name, "not a regular file"))
        elif is_weight_file(name):
            skipped.append((name, "weights or pickle file, not part of this checkpoint"))
        elif path.stat().st_size > max_bytes:
            skipped.append((name, f"larger than {max_bytes} bytes"))
        else:
            kept.append(path)
    return kept, skipped
