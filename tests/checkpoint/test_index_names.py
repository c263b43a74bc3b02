"""Shard names read from an index file name files in the index's own folder, nowhere else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlsubnet.checkpoint import open_checkpoint, save_state_dict
from rlsubnet.cli.main import main
from rlsubnet.errors import CheckpointError

INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tmp_path):
    tensors = {f"layers.{i}.weight": torch.full((16, 16), float(i)) for i in range(3)}
    folder = save_state_dict(tensors, tmp_path / "ck", max_shard_bytes=1024)
    index = json.loads((folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3
    return folder, index


def _point_shard_at(folder: Path, index: dict, shard: str) -> str:
    """Rename the first tensor's shard in the index to ``shard``; returns the tensor's name."""
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    (folder / INDEX).write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder", "dotdot", "empty", "backslash", "not-a-string"])
def test_shard_outside_the_folder_is_refused(sharded, tmp_path, capsys, kind):
    folder, index = sharded
    first = folder / index["weight_map"][next(iter(index["weight_map"]))]
    # A real shard at every place the hostile name points, so only the name check can refuse it.
    shutil.copy(first, tmp_path / "outside.safetensors")
    (folder / "sub").mkdir()
    shutil.copy(first, folder / "sub" / "x.safetensors")
    shard = {
        "parent": "../outside.safetensors",
        "absolute": str(tmp_path / "outside.safetensors"),
        "subfolder": "sub/x.safetensors",
        "dotdot": "..",
        "empty": "",
        "backslash": "..\\outside.safetensors",
        "not-a-string": 12,
    }[kind]
    tensor = _point_shard_at(folder, index, shard)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(folder)
    msg = str(exc.value)
    assert msg.startswith(f"{folder / INDEX}: shard of tensor {tensor!r}: {shard!r} is not a plain file name"), msg
    assert main(["compare", str(folder), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / INDEX) in err[0] and repr(shard) in err[0]


def test_pickle_index_naming_a_file_elsewhere_is_refused(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "elsewhere.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.bin"}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: shard of tensor 'w': "
                                              r"'\.\./elsewhere\.bin' is not a plain file name"):
        open_checkpoint(folder, allow_pickle=True)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": ["w"]}))
    with pytest.raises(CheckpointError, match="corrupt index"):
        open_checkpoint(folder, allow_pickle=True)


def test_symlinked_shard_is_followed(sharded, tmp_path):
    """The hub cache links each file of a snapshot to a blob outside the snapshot folder: that still reads."""
    folder, index = sharded
    name = next(iter(index["weight_map"]))
    shard = folder / index["weight_map"][name]
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    shutil.move(shard, blob)
    shard.symlink_to(blob)
    with open_checkpoint(folder) as ck:
        assert torch.equal(ck.read(name), torch.zeros(16, 16))
