"""Property-based tests of the checkpoint parsers: a safetensors header and a ``model.safetensors.index.json``
damaged in any way give a one-line RlsubnetError or a correct read, never another exception.

"Correct" is judged independently of rlsubnet's parser: every tensor rlsubnet returns has the dtype and shape the
damaged header states (parsed here with plain ``json``) and exactly the bytes at its offsets; when the safetensors
library also accepts the file, both hold the same tensors. For an index, the checkpoint holds exactly the tensors of
the shards the damaged index names, each with the original's bytes.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import examples
from rlsubnet.checkpoint import open_checkpoint, save_state_dict
from rlsubnet.checkpoint.index import ST_DTYPES, read_index_json, read_safetensors_header
from rlsubnet.errors import CheckpointError, RlsubnetError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(3, 5, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(7, generator=g).to(torch.float16),
        "model.position_ids": torch.arange(5, dtype=torch.int64),
        "model.flags": torch.tensor([True, False, True]),
        "model.scale": torch.tensor(0.5, dtype=torch.float64),
        "model.empty": torch.empty(0, 3),
        "lm_head.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
    }


@st.composite
def edits(draw, size: int, lo: int = 0):
    """1-3 edits of bytes [lo, size) of a file: flips, overwritten bytes (often JSON punctuation and digits, so
    the header stays JSON more often), insertions, deletions, truncation, garbage, very long numbers."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "text", "insert", "delete", "truncate", "append", "digits"]))
        where = draw(st.integers(lo, max(lo, size - 1)))
        if op == "flip":
            arg = draw(st.integers(1, 255))
        elif op in ("set", "text"):
            op, arg = "set", draw(st.integers(0, 255) if op == "set" else st.sampled_from(b'0123456789-.eE"[]{},: '))
        elif op == "digits":  # a number too long for Python's int() (more than 4300 digits)
            op, arg = "insert", b"9" * draw(st.sampled_from([20, 4301, 5000]))
        else:
            arg = draw(st.binary(min_size=1, max_size=16))
        ops.append((op, where, arg))
    return ops


def apply_edits(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, where, arg in ops:
        where = min(where, max(0, len(out) - 1))
        if op == "flip" and out:
            out[where] ^= arg
        elif op == "set" and out:
            out[where] = arg
        elif op == "insert":
            out[where:where] = arg
        elif op == "delete":
            del out[where : where + len(arg)]
        elif op == "truncate":
            del out[where:]
        elif op == "append":
            out += arg
    return bytes(out)


def _one_line(exc: BaseException) -> None:
    assert isinstance(exc, RlsubnetError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in str(exc), str(exc)


# ------------------------------------------------------------------------------------------ safetensors header
@pytest.fixture(scope="module")
def st_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz_st") / "model.safetensors"
    save_state_dict(_tensors(), path.parent)
    return path.read_bytes()


def _reference(raw: bytes) -> dict:
    """The damaged file as its header literally says: name -> (st dtype, shape, bytes); None if unparsable."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    return {k: (v["dtype"], list(v["shape"]), data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


@examples(150)
@given(data=st.data())
def test_damaged_safetensors_header_is_refused_or_read_correctly(st_file, data):
    header_end = 8 + struct.unpack("<Q", st_file[:8])[0]
    # the length prefix and the header mostly; sometimes anywhere in the file
    size = data.draw(st.sampled_from([header_end, header_end, len(st_file)]))
    damaged = apply_edits(st_file, data.draw(edits(size)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(damaged)
        try:
            infos, _ = read_safetensors_header(path)
            with open_checkpoint(path) as ck:
                got = {n: ck.read(n) for n in ck.names()}
        except Exception as exc:  # noqa: BLE001 - the property: only RlsubnetError, in one line
            _one_line(exc)
            return
        ref = _reference(damaged)
        assert set(got) == set(ref) == set(infos)
        for name, t in got.items():
            st_dtype, shape, raw = ref[name]
            assert t.dtype == ST_DTYPES[st_dtype] and list(t.shape) == shape, name
            assert bytes(t.reshape(-1).view(torch.uint8).numpy()) == raw, name
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                lib = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - the library is stricter in places (e.g. gaps between tensors)
            return
        assert set(lib) == set(got)
        for name, t in lib.items():
            assert t.dtype == got[name].dtype and torch.equal(t.reshape(-1).view(torch.uint8),
                                                               got[name].reshape(-1).view(torch.uint8))


def _st_file_with_header(tmp_path: Path, header_text: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)
    return path


@pytest.mark.parametrize("header", [
    b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',  # int() refuses > 4300 digits
    b'{"__metadata__":{"a":' + b"1" * 4500 + b'}}',
    b'{"\\ud800w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',  # a lone surrogate is no UTF-8 name
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"\\udfff":"x"}}',
    b"[" * 100_000 + b"]" * 100_000,
])
def test_header_json_that_python_cannot_hold_is_a_one_line_error(tmp_path, header):
    path = _st_file_with_header(tmp_path, header, b"\0" * 4)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as info:
        read_safetensors_header(path)
    _one_line(info.value)


# -------------------------------------------------------------------------------------------- index.json
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_index") / "ck"
    save_state_dict(_tensors(), folder, max_shard_bytes=64)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file()
    return folder, {p: (folder / p).read_bytes() for p in shards}, (folder / "model.safetensors.index.json").read_bytes()


@st.composite
def index_damage(draw, index: bytes, shards: list[str]):
    """Either byte edits of the index file, or an edit of its meaning that keeps it valid JSON."""
    if draw(st.booleans()):
        return apply_edits(index, draw(edits(len(index))))
    doc = json.loads(index)
    wm = doc["weight_map"]
    names = sorted(wm)
    op = draw(st.sampled_from(["drop", "move", "rename_shard", "add", "type", "drop_shard", "only"]))
    if op == "drop":
        for n in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            del wm[n]
    elif op == "move":
        wm[draw(st.sampled_from(names))] = draw(st.sampled_from(shards))
    elif op == "rename_shard":
        wm[draw(st.sampled_from(names))] = draw(st.sampled_from(
            ["", ".", "..", "missing.safetensors", "model.safetensors.index.json", "/dev/null", "ck/" + shards[0]]))
    elif op == "add":
        wm[draw(st.text(max_size=8))] = draw(st.sampled_from(shards))
    elif op == "type":
        doc[draw(st.sampled_from(["weight_map", "metadata"]))] = draw(st.sampled_from([None, [], 3, "x", {}, [shards[0]]]))
    elif op == "drop_shard":  # every entry of one shard gone: the index no longer names that file
        gone = draw(st.sampled_from(shards))
        doc["weight_map"] = {n: s for n, s in wm.items() if s != gone}
    else:  # one entry only
        n = draw(st.sampled_from(names))
        doc["weight_map"] = {n: wm[n]}
    return json.dumps(doc).encode()


@examples(120)
@given(data=st.data())
def test_damaged_index_is_refused_or_read_correctly(sharded, data):
    folder, shards, index = sharded
    damaged = data.draw(index_damage(index, sorted(shards)))
    original = _tensors()
    with tempfile.TemporaryDirectory() as tmp:
        ck_dir = Path(tmp) / "ck"
        ck_dir.mkdir()
        for name, raw in shards.items():
            (ck_dir / name).write_bytes(raw)
        (ck_dir / "model.safetensors.index.json").write_bytes(damaged)
        try:
            read_index_json(ck_dir / "model.safetensors.index.json")
            with open_checkpoint(ck_dir) as ck:
                got = {n: ck.read(n) for n in ck.names()}
        except Exception as exc:  # noqa: BLE001 - the property: only RlsubnetError, in one line
            _one_line(exc)
            return
        wm = json.loads(damaged)["weight_map"]
        named = {(ck_dir / str(s)).resolve() for s in wm.values()}
        expected = set()
        for shard in named:
            infos, _ = read_safetensors_header(shard)
            expected |= set(infos)
        assert set(got) == expected
        assert set(wm) <= expected  # every tensor the index names is there (in the shard it names)
        for name, t in got.items():
            want = original[name]
            assert t.dtype == want.dtype and t.shape == want.shape
            assert torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("text", [
    b'{"weight_map": {"w": "a.safetensors"}, "metadata": {"total_size": ' + b"7" * 5000 + b"}}",
    b'{"weight_map": {"w": "a.safetensors"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_index_json_that_python_cannot_hold_is_a_one_line_error(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(CheckpointError, match="corrupt index") as info:
        read_index_json(tmp_path / "model.safetensors.index.json")
    _one_line(info.value)


@pytest.mark.parametrize("names", [["__metadata__"], ["w", "w"], ["\ud800"]])
def test_writer_refuses_names_a_header_cannot_hold(tmp_path, names):
    """A tensor named "__metadata__" or a repeated name would overwrite a header entry (a file that reads back as
    something else, or not at all); a lone surrogate cannot be stored. Refused before anything is written."""
    from rlsubnet.checkpoint import SafetensorsWriter
    from rlsubnet.errors import UsageError
    from rlsubnet.masks import Mask, MaskError

    with pytest.raises(UsageError, match="tensor name"):
        SafetensorsWriter(tmp_path / "x.safetensors", [(n, torch.float32, (2,)) for n in names], {"format": "pt"})
    assert list(tmp_path.iterdir()) == []
    if len(set(names)) == 1 and names[0] != "w":
        with pytest.raises((UsageError, MaskError)):
            Mask.from_bool({names[0]: torch.ones(3, dtype=torch.bool)}).save(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []
