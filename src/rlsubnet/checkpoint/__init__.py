"""Checkpoint access: the only package that opens files or reaches the network."""

from rlsubnet.checkpoint.index import TensorInfo, dtype_name, element_size, read_safetensors_header
from rlsubnet.checkpoint.reader import Checkpoint, PickleCheckpoint, SafetensorsCheckpoint, StateDictCheckpoint
from rlsubnet.checkpoint.resolve import open_checkpoint
from rlsubnet.checkpoint.writer import (
    SafetensorsWriter,
    plan_shards,
    save_state_dict,
    shard_file_names,
    write_checkpoint,
)
from rlsubnet.fileio import atomic_dir, atomic_write_bytes, atomic_write_text

__all__ = [
    "Checkpoint",
    "PickleCheckpoint",
    "SafetensorsCheckpoint",
    "SafetensorsWriter",
    "StateDictCheckpoint",
    "TensorInfo",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "dtype_name",
    "element_size",
    "open_checkpoint",
    "plan_shards",
    "read_safetensors_header",
    "save_state_dict",
    "shard_file_names",
    "write_checkpoint",
]
