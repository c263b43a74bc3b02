"""Turn what the user typed into a :class:`Checkpoint`: a folder, a file, or a hub id from the local cache.

This is the only module that may reach the network, and only with ``allow_download=True``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from rlsubnet.checkpoint.reader import (
    Checkpoint,
    PickleCheckpoint,
    SafetensorsCheckpoint,
    StateDictCheckpoint,
    safetensors_files_in,
)
from rlsubnet.checkpoint.tensors import unique_tensors
from rlsubnet.errors import CheckpointError
from rlsubnet.fileio import safe_member_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Pickle files a transformers Trainer writes beside the weights.
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "scaler", "rng_state", "trainer_state")
# A repository id on the hub: "name" or "org/name", optionally "@revision".
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _refuse_pickle(what: Path) -> None:
    raise CheckpointError(
        f"{what}: pickle checkpoints can run arbitrary code when loaded; pass --allow-pickle "
        "(allow_pickle=True) to load them with torch.load(weights_only=True)"
    )


def _pickle_files_in(folder: Path) -> list[Path]:
    index_path = folder / PICKLE_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: corrupt index ({exc})") from None
        files = sorted(
            {
                folder / safe_member_name(s, f"{index_path}: shard of tensor {n!r}", CheckpointError)
                for n, s in weight_map.items()
            }
        )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: names missing shard file(s): {', '.join(missing)}")
        return files
    candidates = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    # A Trainer output folder also holds training_args.bin, optimizer.pt, rng_state.pth...: not weights.
    named = [p for p in candidates if p.name.startswith(("pytorch_model", "model"))]
    return named or [p for p in candidates if not p.name.startswith(NOT_WEIGHTS)]


def _from_folder(source: str, folder: Path, allow_pickle: bool) -> Checkpoint:
    files, weight_map = safetensors_files_in(folder)
    if files:
        return SafetensorsCheckpoint(source, str(folder), files, weight_map)
    pickles = _pickle_files_in(folder)
    if pickles:
        if not allow_pickle:
            _refuse_pickle(pickles[0])
        return PickleCheckpoint(source, str(folder), pickles)
    raise CheckpointError(
        f"{folder}: no weights found (looked for model.safetensors.index.json, *.safetensors, "
        f"{PICKLE_INDEX}, *.bin, *.pt)"
    )


def _looks_like_hub_id(spec: str) -> bool:
    repo_id = spec.partition("@")[0]
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        return False
    # "model.safetensors" that does not exist is a missing file, not a hub id.
    return not repo_id.endswith((".safetensors", ".json", *PICKLE_SUFFIXES))


def _from_hub(spec: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            local_files_only=not allow_download,
            allow_patterns=["*.safetensors", "*.json", "*.bin", "*.pt"],
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{spec}: no such file or folder, and not in the local Hugging Face cache "
            "(pass --allow-download to fetch it from the hub)"
        ) from None
    except Exception as exc:  # hub errors come in many types; the message is what the user needs
        raise CheckpointError(f"{spec}: cannot resolve from the Hugging Face hub ({exc})") from None
    return Path(path)


def open_checkpoint(
    spec: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module | Checkpoint,
    *,
    allow_pickle: bool = False,
    allow_download: bool = False,
    label: str | None = None,
) -> Checkpoint:
    """Open a checkpoint for streaming reads.

    ``spec`` is a Hugging Face model folder (``model.safetensors`` or shards with
    ``model.safetensors.index.json``), a single ``.safetensors`` file, a hub id (``[org/]name[@revision]``) found in
    the local cache, an in-memory state dict or module, or an already open :class:`Checkpoint`.
    """
    if isinstance(spec, Checkpoint):
        return spec
    if isinstance(spec, torch.nn.Module):
        # tied weights once: Hugging Face checkpoints save a tied lm_head only as the embedding
        return StateDictCheckpoint(unique_tensors(spec), label or f"<{type(spec).__name__}>")
    if isinstance(spec, Mapping):
        return StateDictCheckpoint(spec, label or "<state dict>")
    source = str(spec)
    path = Path(source).expanduser()
    try:
        return _open_path(source, path, allow_pickle, allow_download)
    except OSError as exc:  # a folder we may not list, a file we may not open...
        raise CheckpointError(f"{exc.filename or path}: cannot read ({exc.strerror or exc})") from None


def _open_path(source: str, path: Path, allow_pickle: bool, allow_download: bool) -> Checkpoint:
    if path.is_dir():
        return _from_folder(source, path, allow_pickle)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(source, str(path), [path])
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                _refuse_pickle(path)
            return PickleCheckpoint(source, str(path), [path])
        if path.name.endswith(".index.json"):
            return _from_folder(source, path.parent, allow_pickle)
        raise CheckpointError(f"{path}: not a checkpoint (expected a folder, .safetensors, .bin or .pt)")
    if path.exists():
        raise CheckpointError(f"{path}: not a regular file or folder")
    if _looks_like_hub_id(source):
        return _from_folder(source, _from_hub(source, allow_download), allow_pickle)
    raise CheckpointError(f"{source}: no such file or folder")
