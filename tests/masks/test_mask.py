"""The mask artifact: building (same changed-test as compare), round trips, exact bytes, combining, corruption."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

import rlsubnet
from rlsubnet.checkpoint import open_checkpoint, save_state_dict
from rlsubnet.checkpoint.hashing import hash_checkpoint
from rlsubnet.errors import MismatchError
from rlsubnet.diff.changed import changed_mask
from rlsubnet.masks import Mask, MaskError, MaskMismatchError, build_mask
from rlsubnet.testing import changed_positions, llama_specs, write_synthetic_pair


def _read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


# -- building: the compare engine's changed-test, exactly
@pytest.mark.parametrize("atol", [0.0, 1e-5, 1e-4])
def test_density_equals_compare_on_synthetic_pair(sharded_pair, atol):
    base, tuned, changed_at_0, _ = sharded_pair
    m = build_mask(base, tuned, atol=atol)
    r = rlsubnet.compare(base, tuned, atol=(atol,))
    assert m.changed == r.changed(atol)
    assert m.density == r.density(atol)
    if atol == 0.0:
        assert m.changed == changed_at_0
    # per-tensor counts agree too, not only the total
    per_tensor = {s.name: s.changed[0] for s in r.tensors}
    assert m.counts == per_tensor
    # and so do the per-layer and per-module groupings
    r_layers = {row["layer"]: row["by_atol"][0]["changed"] for row in r.layers()}
    assert {row["layer"]: row["changed"] for row in m.layers()} == r_layers
    r_modules = {row["module"]: row["by_atol"][0]["changed"] for row in r.modules()}
    assert {row["module"]: row["changed"] for row in m.modules()} == r_modules


def test_bits_are_the_known_changed_positions(sharded_pair):
    base, tuned, _, specs = sharded_pair
    m = build_mask(base, tuned, atol=0.0)
    for name, _, shape in specs:
        numel = torch.Size(shape).numel()
        expected = np.zeros(numel, dtype=bool)
        expected[changed_positions(name, numel, 0.2, seed=1).numpy()] = True
        assert np.array_equal(m.numpy(name).reshape(-1), expected), name


def _hard_pair():
    """bf16 / fp32 / int tensors with NaN, Inf, ±0, subnormals and deltas right at the bf16-rounded atol."""
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(4099, generator=g) * 1e-4).to(torch.bfloat16)
    b = a.clone()
    b[:700] = (a[:700].float() + torch.randn(700, generator=g) * 1e-5).to(torch.bfloat16)
    b[700] = float("nan")
    b[701] = float("inf")
    a[702], b[702] = 0.0, -0.0
    a[703], b[703] = float("inf"), float("inf")
    b[704] = a[704].float() + 1.0014e-5  # around the rounded threshold
    f32a = torch.randn(1001, generator=g)
    f32b = f32a + torch.randn(1001, generator=g) * 1e-5 * (torch.rand(1001, generator=g) < 0.5)
    ia = torch.arange(37, dtype=torch.int64)
    ib = ia.clone()
    ib[::5] += 1
    return {"x.weight": a, "y.weight": f32a, "z": ia}, {"x.weight": b, "y.weight": f32b, "z": ib}


@pytest.mark.parametrize("mode", ["bf16", "fp32", "native"])
@pytest.mark.parametrize("atol", [0.0, 1e-5])
def test_density_equals_compare_on_hard_values(mode, atol):
    base, tuned = _hard_pair()
    m = build_mask(base, tuned, atol=atol, mode=mode, block_bytes=64)  # tiny blocks: many block boundaries
    r = rlsubnet.compare(base, tuned, atol=(atol,), mode=mode)
    assert m.counts == {s.name: s.changed[0] for s in r.tensors}
    assert m.density == r.density(atol)


def test_bits_equal_torch_isclose_definition():
    base, tuned = _hard_pair()
    for mode, cmp in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = build_mask(base, tuned, atol=1e-5, mode=mode)
        for name in ("x.weight", "y.weight"):
            delta = tuned[name].to(cmp) - base[name].to(cmp)
            expected = ~torch.isclose(delta, torch.zeros_like(delta), atol=1e-5, rtol=0)
            assert torch.equal(m.tensor(name), expected), (mode, name)
            assert torch.equal(changed_mask(base[name], tuned[name], 1e-5, mode), expected)


def test_block_size_does_not_change_the_mask(sharded_pair):
    base, tuned, _, _ = sharded_pair
    a = build_mask(base, tuned, atol=1e-5)
    b = build_mask(base, tuned, atol=1e-5, block_bytes=24)  # 8 bf16 entries per block
    assert a == b and a.bits_sha256() == b.bits_sha256()


def test_metadata_records_settings_and_identity(sharded_pair, tmp_path):
    base, tuned, _, specs = sharded_pair
    m = build_mask(base, tuned, atol=1e-5)
    assert m.atol == 1e-5 and m.dtype == "bf16" and m.kind == "changed"
    assert m.meta["extra"]["compare_dtypes"] == {"bfloat16": len(specs)}
    for side, path in (("base", base), ("tuned", tuned)):
        ident = m.meta[side]
        ck = open_checkpoint(path)
        assert ident["source"] == str(path)
        assert ident["numel"] == ck.numel and ident["n_tensors"] == len(specs)
        # the content hash is the project's checkpoint hash, computed while streaming
        assert ident["content_hash"] == hash_checkpoint(ck).digest
        assert ident["content_scope"] == "all tensors"
    # identity does not depend on sharding: the same tensors in one file hash the same
    one_file = tmp_path / "one"
    save_state_dict({n: open_checkpoint(base).read(n) for n in open_checkpoint(base).names()}, one_file)
    m2 = build_mask(one_file, tuned, atol=1e-5)
    assert m2.meta["base"]["content_hash"] == m.meta["base"]["content_hash"]
    assert m2.meta["base"]["layout_sha256"] == m.meta["base"]["layout_sha256"]
    # ... and any changed weight changes it
    edited = {n: open_checkpoint(base).read(n) for n in open_checkpoint(base).names()}
    name = next(iter(edited))
    edited[name] = edited[name].clone()
    edited[name].view(torch.int16).reshape(-1)[0] ^= 1
    m3 = build_mask(edited, tuned, atol=1e-5)
    assert m3.meta["base"]["content_hash"] != m.meta["base"]["content_hash"]
    assert build_mask(base, tuned, hash_content=False).meta["base"]["content_hash"] is None


def test_mismatched_checkpoints(sharded_pair, tmp_path):
    base, tuned, _, specs = sharded_pair
    ck = open_checkpoint(tuned)
    tensors = {n: ck.read(n) for n in ck.names()}
    dropped = specs[1][0]
    del tensors[dropped]
    partial = tmp_path / "partial"
    save_state_dict(tensors, partial)
    with pytest.raises(MismatchError, match="missing"):
        build_mask(base, partial)
    m = build_mask(base, partial, allow_mismatch=True)
    assert dropped not in m and len(m) == len(specs) - 1
    assert m.meta["extra"]["skipped"][0]["name"] == dropped


# -- the artifact
def test_round_trip_bits_metadata_and_bytes(sharded_pair, tmp_path):
    base, tuned, _, _ = sharded_pair
    m = build_mask(base, tuned, atol=1e-5)
    p1 = m.save(tmp_path / "m.safetensors")
    loaded = Mask.load(p1)
    assert loaded == m
    assert loaded.counts == m.counts and loaded.shapes == m.shapes
    for key in ("kind", "atol", "dtype", "base", "tuned", "extra"):
        assert loaded.meta[key] == m.meta[key], key
    assert loaded.meta["path"] == str(p1)
    # saving what was loaded writes the same bytes: the file is a function of bits and metadata only
    p2 = loaded.save(tmp_path / "again.safetensors")
    assert p1.read_bytes() == p2.read_bytes()
    # about one bit per parameter
    assert p1.stat().st_size < m.numel / 8 + 8192


def test_exact_bytes_of_a_tiny_mask(tmp_path):
    flags = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    m = Mask.from_bool({"w": flags.reshape(3, 3), "b": torch.zeros(2, dtype=torch.bool)}, {"atol": 1e-5, "dtype": "bf16"})
    path = m.save(tmp_path / "tiny.safetensors")
    header, data = _read_header(path)
    # big bit order: entry 0 is the top bit of byte 0; padding bits are zero
    assert data == bytes([0b10110000, 0b10000000, 0b00000000])
    assert header["w"] == {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    assert header["b"] == {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]}
    md = header["__metadata__"]
    assert md["format"] == "rlsubnet.mask" and md["format_version"] == "2" and md["bitorder"] == "big"
    assert md["rlsubnet_version"] == rlsubnet.__version__
    assert json.loads(md["atol"]) == 1e-5 and json.loads(md["dtype"]) == "bf16"
    assert md["density"] == repr(4 / 11) and md["numel"] == "11" and md["changed"] == "4"
    assert json.loads(md["tensors"]) == {"w": {"shape": [3, 3], "changed": 4}, "b": {"shape": [2], "changed": 0}}
    assert np.array_equal(np.packbits(flags.numpy()), np.frombuffer(data[:2], dtype=np.uint8))
    assert torch.equal(Mask.load(path).tensor("w"), flags.reshape(3, 3))
    # the metadata checksum: SHA-256 over one JSON line [key, value] per covered field, in this order
    keys = ["format", "format_version", "rlsubnet_version", "kind", "atol", "dtype", "density", "numel", "changed",
            "bitorder", "tensors", "base", "tuned", "extra", "bits_sha256"]
    lines = "".join(json.dumps([k, md[k]]) + "\n" for k in keys)
    assert md["meta_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert sorted(md) == sorted(keys + ["meta_sha256"])


def test_breakdowns():
    t = {
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([[1, 0], [0, 0]], dtype=torch.bool),
        "model.layers.0.mlp.up_proj.weight": torch.tensor([1, 1, 1, 0], dtype=torch.bool),
        "model.layers.1.self_attn.q_proj.weight": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
        "model.norm.weight": torch.tensor([0, 0], dtype=torch.bool),
    }
    m = Mask.from_bool(t)
    assert m.changed == 6 and m.numel == 14 and m.density == 6 / 14 and m.sparsity == 1 - 6 / 14
    layers = {r["layer"]: (r["changed"], r["numel"], r["density"]) for r in m.layers()}
    assert layers == {0: (4, 8, 0.5), 1: (2, 4, 0.5), None: (0, 2, 0.0)}
    modules = {r["module"]: (r["changed"], r["numel"]) for r in m.modules()}
    assert modules == {"q": (3, 8), "up": (3, 4), "norm": (0, 2)}
    per_tensor = {r["name"]: r["density"] for r in m.per_tensor()}
    assert per_tensor["model.layers.0.mlp.up_proj.weight"] == 0.75


def test_union_intersection_difference_complement():
    a = Mask.from_bool({"w": torch.tensor([1, 1, 0, 0, 1, 0, 1, 0, 1], dtype=torch.bool)})
    b = Mask.from_bool({"w": torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)})
    assert (a | b).tensor("w").tolist() == [True, True, True, False, True, True, True, False, True]
    assert (a & b).tensor("w").tolist() == [True, False, False, False, True, False, False, False, True]
    assert (a - b).tensor("w").tolist() == [False, True, False, False, False, False, True, False, False]
    assert a.complement().tensor("w").tolist() == [False, False, True, True, False, True, False, True, False]
    assert a.complement().changed == 4  # padding bits stay clear
    assert a.intersection_count(b) == (a & b).changed == 3
    u = a.union(b)
    assert u.kind == "union" and len(u.meta["extra"]["operands"]) == 2


def test_combining_different_layouts_is_refused():
    a = Mask.from_bool({"w": torch.ones(4, dtype=torch.bool), "v": torch.ones(2, dtype=torch.bool)})
    other_names = Mask.from_bool({"w": torch.ones(4, dtype=torch.bool), "u": torch.ones(2, dtype=torch.bool)})
    other_shape = Mask.from_bool({"w": torch.ones(2, 2, dtype=torch.bool), "v": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="only in the first: v"):
        a | other_names
    with pytest.raises(MaskMismatchError, match=r"different shapes: w \[4\] vs \[2, 2\]"):
        a & other_shape
    with pytest.raises(MaskMismatchError):
        a.intersection_count(other_shape)


# -- corrupt and foreign files
@pytest.fixture
def saved_mask(tmp_path):
    t = {"a": torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.3, "b": torch.ones(13, dtype=torch.bool)}
    return Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"}).save(tmp_path / "m.safetensors")


def test_flipped_bit_is_detected(saved_mask):
    raw = bytearray(saved_mask.read_bytes())
    raw[-3] ^= 0b00010000  # inside tensor b's bytes, count changes
    saved_mask.write_bytes(bytes(raw))
    with pytest.raises(MaskError, match="bits set but the metadata records"):
        Mask.load(saved_mask)


def test_swapped_bits_are_detected_by_the_checksum(saved_mask):
    header, data = _read_header(saved_mask)
    start = len(saved_mask.read_bytes()) - len(data)
    raw = bytearray(saved_mask.read_bytes())
    first = raw[start]
    raw[start] = ((first << 1) | (first >> 7)) & 0xFF  # rotate: same popcount, different bits
    assert raw[start] != first
    saved_mask.write_bytes(bytes(raw))
    with pytest.raises(MaskError, match="checksum"):
        Mask.load(saved_mask)


def test_truncated_file_is_detected(saved_mask):
    saved_mask.write_bytes(saved_mask.read_bytes()[:-5])
    with pytest.raises(MaskError, match="truncated"):
        Mask.load(saved_mask)


def test_garbage_and_foreign_files(tmp_path, sharded_pair):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a mask at all")
    with pytest.raises(MaskError, match="not a readable mask file"):
        Mask.load(junk)
    base = sharded_pair[0]
    shard = sorted(base.glob("*.safetensors"))[0]
    with pytest.raises(MaskError, match="not an rlsubnet mask"):
        Mask.load(shard)
    with pytest.raises(MaskError, match="no such mask file"):
        Mask.load(tmp_path / "absent.safetensors")
    with pytest.raises(MaskError, match="folder"):
        Mask.load(base)


def test_metadata_that_lies_about_shapes(saved_mask, tmp_path):
    header, data = _read_header(saved_mask)
    tensors = json.loads(header["__metadata__"]["tensors"])
    tensors["a"]["shape"] = [200]
    header["__metadata__"]["tensors"] = json.dumps(tensors)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(MaskError, match=r"expected uint8 \[25\]"):
        Mask.load(bad)


def _with_metadata(saved_mask, tmp_path, **fields):
    header, data = _read_header(saved_mask)
    for k, v in fields.items():
        if v is None:
            header["__metadata__"].pop(k)
        else:
            header["__metadata__"][k] = v
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return bad


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"atol": '"abc"'}, "atol is 'abc'"),
        ({"atol": "-1"}, "atol is -1"),
        ({"dtype": "3"}, "dtype is 3"),
        ({"base": "5"}, "base is int"),
        ({"extra": "[1, 2]"}, "extra is list"),
        ({"tensors": "[1]"}, "corrupt mask metadata"),
        ({"tensors": json.dumps({"a": {"shape": [-100], "changed": 0}, "b": {"shape": [13], "changed": 13}})},
         "non-negative integer, got -100"),
        ({"tensors": json.dumps({"a": {"shape": [100.0], "changed": 0}, "b": {"shape": [13], "changed": 13}})},
         "non-negative integer, got 100.0"),
        ({"bits_sha256": None}, "no bits_sha256"),
    ],
)
def test_corrupt_metadata_fails_at_load_in_one_line(saved_mask, tmp_path, capsys, fields, needle):
    """The checksum covers the bits only: metadata of the wrong type must fail at load, not deep in a report."""
    from rlsubnet.cli.main import main

    bad = _with_metadata(saved_mask, tmp_path, **fields)
    with pytest.raises(MaskError, match="corrupt mask metadata"):
        Mask.load(bad)
    for argv in (["mask", "--info", str(bad)], ["overlap", str(bad), str(saved_mask)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("fields", [
    {"atol": "2e-05"}, {"dtype": '"fp32"'}, {"kind": "random"}, {"extra": '{"skipped":[1]}'},
    {"base": '{"source":"elsewhere"}'}, {"format_version": "1"}, {"meta_sha256": "0" * 64}, {"meta_sha256": None},
])
def test_valid_but_changed_metadata_is_detected(saved_mask, tmp_path, fields):
    """Metadata that parses and type-checks but is not what was written: another atol, mode or kind would
    silently change what the mask means."""
    bad = _with_metadata(saved_mask, tmp_path, **fields)
    with pytest.raises(MaskError, match="corrupt mask metadata"):
        Mask.load(bad)


def test_version_1_masks_without_a_metadata_checksum_are_still_read(saved_mask, tmp_path):
    old = _with_metadata(saved_mask, tmp_path, format_version="1", meta_sha256=None)
    m = Mask.load(old)
    assert m.same_bits(Mask.load(saved_mask)) and m.atol == 1e-5 and m.mode == "bf16"


def test_in_memory_constructors_validate():
    with pytest.raises(MaskError, match="padding bits"):
        Mask({"w": (3,)}, {"w": np.array([0xFF], dtype=np.uint8)})
    with pytest.raises(MaskError, match="packed bytes"):
        Mask({"w": (30,)}, {"w": np.zeros(3, dtype=np.uint8)})
    with pytest.raises(MaskError, match="not bool"):
        Mask.from_bool({"w": torch.ones(3)})


def test_a_larger_model_streams_in_bounded_blocks(tmp_path):
    """Tensors spanning many blocks and shards give the same mask as one-block reading."""
    specs = llama_specs(layers=1, hidden=64, intermediate=160, vocab=101)
    base, tuned = tmp_path / "b", tmp_path / "t"
    write_synthetic_pair(base, tuned, specs=specs, density=0.05, seed=4, max_shard_bytes=20_000)
    small_blocks = build_mask(base, tuned, atol=0.0, block_bytes=1000)
    one_block = build_mask(base, tuned, atol=0.0, block_bytes=1 << 30)
    assert small_blocks == one_block
    assert small_blocks.changed == rlsubnet.compare(base, tuned, atol=(0.0,)).changed(0.0)


def test_identity_of_two_models():
    """Identity (paper §2): share of entries with |θ_full − θ_sub| ≤ atol, overall and inside a mask."""
    from rlsubnet.masks import identity

    full = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=torch.bfloat16)}
    sub = {"w": full["w"].clone()}
    sub["w"][0] = 1.0078125  # one bf16 ULP above 1.0: differs at atol 0 and 1e-5, not at 1e-2
    sub["w"][5] = 7.0  # differs at every atol here
    inside = Mask.from_bool({"w": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)})
    recs = {r["atol"]: r for r in identity(full, sub, atols=(0.0, 1e-5, 1e-2), inside=inside)}
    assert recs[0.0]["identity"] == 6 / 8 and recs[1e-5]["identity"] == 6 / 8 and recs[1e-2]["identity"] == 7 / 8
    assert recs[0.0]["identity_in_mask"] == 3 / 4 and recs[1e-2]["identity_in_mask"] == 1.0
    r = rlsubnet.compare(full, sub, atol=(0.0, 1e-2))
    assert recs[0.0]["identity"] == r.sparsity(0.0) and recs[1e-2]["identity"] == r.sparsity(1e-2)
