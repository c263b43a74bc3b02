"""Property-based tests of the mask file: random masks round-trip exactly; a damaged mask file is refused in one
line or read back exactly as written (bits, shapes, names and every metadata field a reader uses)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import examples
from rlsubnet.errors import RlsubnetError
from rlsubnet.masks import Mask

NAMES = st.one_of(
    st.sampled_from(["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight", "w", "b.0"]),
    st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12),
)
SHAPES = st.lists(st.integers(0, 11), min_size=0, max_size=3).map(tuple)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8),
                      st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def masks(draw) -> Mask:
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    tensors = {}
    for name in names:
        shape = draw(SHAPES)
        numel = math.prod(shape)
        raw = draw(st.binary(min_size=(numel + 7) // 8, max_size=(numel + 7) // 8))
        flags = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=numel).astype(bool)
        tensors[name] = torch.from_numpy(flags.reshape(shape))
    meta = {
        "kind": draw(st.sampled_from(["changed", "random", "union", "given"])),
        "atol": draw(st.one_of(st.none(), st.floats(min_value=0.0, allow_nan=False, allow_infinity=False))),
        "dtype": draw(st.sampled_from([None, "bf16", "fp32", "native"])),
        "base": draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=6), JSON_LEAF, max_size=3))),
        "tuned": None,
        "extra": draw(st.dictionaries(st.text(max_size=6), JSON_LEAF, max_size=3)),
    }
    return Mask.from_bool(tensors, meta)


def _same(a: Mask, b: Mask) -> None:
    assert a.names() == b.names()
    assert a.shapes == b.shapes and a.counts == b.counts and a.same_bits(b)
    for key in ("kind", "atol", "dtype", "base", "tuned", "extra"):
        assert a.meta.get(key) == b.meta.get(key), key
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name))


@examples(100)
@given(m=masks())
def test_mask_round_trip(m):
    with tempfile.TemporaryDirectory() as tmp:
        path = m.save(Path(tmp) / "m.safetensors")
        back = Mask.load(path)
    _same(m, back)
    assert back.bits_sha256() == m.bits_sha256()


@pytest.fixture(scope="module")
def saved_mask(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    m = Mask.from_bool(
        {"model.layers.0.self_attn.q_proj.weight": torch.rand(13, 7, generator=g) < 0.3,
         "model.layers.0.mlp.up_proj.weight": torch.rand(40, generator=g) < 0.1,
         "model.norm.weight": torch.zeros(5, dtype=torch.bool)},
        {"kind": "changed", "atol": 1e-5, "dtype": "bf16", "base": {"source": "base", "numel": 136},
         "tuned": {"source": "tuned", "numel": 136}, "extra": {"skipped": []}},
    )
    path = m.save(tmp_path_factory.mktemp("fuzz_mask") / "m.safetensors")
    return m, path.read_bytes()


@st.composite
def damage(draw, size: int):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "text", "insert", "delete", "truncate", "append"]))
        where = draw(st.integers(0, size - 1))
        if op in ("flip", "set"):
            arg = draw(st.integers(1, 255))
        elif op == "text":  # a byte of the JSON header replaced by one that keeps it valid JSON more often
            op, arg = "set", draw(st.sampled_from(b'0123456789.-+eE"ntf,:[]{} \\u'))
        else:
            arg = draw(st.binary(min_size=1, max_size=12))
        ops.append((op, where, arg))
    return ops


def edit(data: bytes, ops) -> bytes:
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


@examples(150)
@given(data=st.data())
def test_damaged_mask_file_is_refused_or_read_exactly(saved_mask, data):
    m, raw = saved_mask
    # half the edits land in the JSON header, where a changed digit is still valid JSON
    header_len = int.from_bytes(raw[:8], "little") + 8
    size = data.draw(st.sampled_from([header_len, len(raw)]))
    damaged = edit(raw, data.draw(damage(size)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(damaged)
        try:
            back = Mask.load(path)
        except RlsubnetError as exc:
            assert "\n" not in str(exc), str(exc)
            return
    _same(m, back)


@examples(100)
@given(data=st.data())
def test_changed_metadata_values_are_refused_or_harmless(saved_mask, data):
    """One metadata string edited in place (a character replaced, inserted or deleted), the header re-encoded
    with a correct length: the JSON stays valid, so only the checks on the values themselves can notice."""
    import json
    import struct

    m, raw = saved_mask
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    md = header["__metadata__"]
    key = data.draw(st.sampled_from(sorted(md)))
    value = md[key]
    i = data.draw(st.integers(0, len(value)))
    ch = data.draw(st.sampled_from('0123456789.-+eE"ntf,:[]{} abcxyz'))
    op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    if op == "replace" and i < len(value):
        value = value[:i] + ch + value[i + 1 :]
    elif op == "delete":
        value = value[:i] + value[i + 1 :]
    else:
        value = value[:i] + ch + value[i:]
    md[key] = value
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
        try:
            back = Mask.load(path)
        except RlsubnetError as exc:
            assert "\n" not in str(exc), str(exc)
            return
    _same(m, back)
