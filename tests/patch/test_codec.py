"""The bit-level coding and the content hash, pinned to exact bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import xxhash
import zstandard

from rlsubnet.checkpoint import open_checkpoint, save_state_dict
from rlsubnet.checkpoint.hashing import HASH_SCHEME, TensorHasher, combine_hashes, hash_checkpoint, hash_state_dict, hash_tensor
from rlsubnet.patch.codec import RecordCursor, TensorEncoder, encode_positions, join_planes, split_planes, varint


@pytest.fixture(autouse=True)
def pipeline():
    """Once, not once per pipeline mode (conftest): the codec has no pipeline."""
    return "default"


def test_varint_and_planes_exact_bytes():
    assert [varint(n) for n in (0, 1, 127, 128, 300, 1 << 20)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x40"
    ]
    words = np.array([0x0102, 0x0304, 0xA0B0], dtype=np.uint16)
    assert split_planes(words) == bytes([0x02, 0x04, 0xB0, 0x01, 0x03, 0xA0])
    assert join_planes(split_planes(words), 2).tolist() == words.tolist()


def test_position_records_exact_bytes():
    block = 1000
    assert encode_positions(np.array([], dtype=np.int64), block) == b"\x00"
    assert encode_positions(np.arange(block), block) == varint(block)  # everything: no list
    # gaps 3, 0, 251 fit one byte: count 3, mode 1, gaps
    assert encode_positions(np.array([3, 4, 256]), block) == b"\x03\x01" + bytes([3, 0, 251])
    # a gap of 700 needs two bytes, planes split: low bytes then high bytes
    assert encode_positions(np.array([0, 701]), block) == b"\x02\x02" + bytes([0, 700 & 0xFF, 0, 700 >> 8])
    # more than 1/7 changed: a bitmap, least significant bit first
    rel = np.arange(0, 16, 2)
    assert encode_positions(rel, 16) == b"\x08\x00" + bytes([0b01010101, 0b01010101])
    big = 1 << 17
    assert encode_positions(np.array([5, 5 + 70_000]), big)[:2] == b"\x02\x04"  # 4-byte gaps


@pytest.mark.parametrize("esize", [1, 2, 4, 8])
def test_encoder_cursor_round_trip_any_ranges(esize):
    rng = np.random.default_rng(esize)
    numel, block = 10_007, 512
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[esize]
    old = rng.integers(0, np.iinfo(kind).max, numel, dtype=kind, endpoint=True)
    new = old.copy()
    density = np.concatenate([np.full(3000, 0.6), np.full(4000, 0.01), np.zeros(3007)])
    hit = rng.random(numel) < density
    new[hit] ^= rng.integers(1, 255, hit.sum(), dtype=kind)
    comp = (zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=3))
    enc = TensorEncoder(numel, esize, comp, block)
    for start in range(0, numel, 4 * block):
        stop = min(numel, start + 4 * block)
        enc.add_delta(start, old[start:stop] ^ new[start:stop], None)
    pos, val = enc.finish()
    assert enc.changed == hit.sum()
    cur = RecordCursor(pos, val, numel, esize, block, False, "t")
    got = old.copy()
    for start, stop in [(0, 1), (1, 777), (777, 5000), (5000, 5000), (5000, numel)]:
        p, v = cur.take(start, stop)
        assert ((p >= start) & (p < stop)).all()
        got[p] ^= v
    assert got.tobytes() == new.tobytes()
    assert cur.changed == hit.sum()


@pytest.mark.parametrize("coding", ["xor", "absolute"])
@pytest.mark.parametrize("esize", [1, 2, 4])
def test_cursor_apply_matches_take_on_any_ranges(coding, esize):
    """apply() (decode + scatter, or spread + XOR on dense blocks) gives the same words as take(), for ranges
    aligned to the coding blocks and not, over empty, sparse, dense (bitmap) and all-changed blocks."""
    rng = np.random.default_rng(10 + esize)
    numel, block = 20_000, 1024
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32}[esize]
    old = rng.integers(0, np.iinfo(kind).max, numel, dtype=kind, endpoint=True)
    new = old.copy()
    density = np.concatenate([np.full(3072, 0.5), np.full(4096, 0.003), np.zeros(2048), np.ones(1024), np.full(numel - 10_240, 0.05)])
    hit = rng.random(numel) < density
    new[hit] ^= rng.integers(1, 255, hit.sum(), dtype=kind)
    comp = (zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=1))
    enc = TensorEncoder(numel, esize, comp, block)
    for start in range(0, numel, 4 * block):
        stop = min(numel, start + 4 * block)
        enc.add_delta(start, old[start:stop] ^ new[start:stop], new[start:stop] if coding == "absolute" else None)
    pos, val = enc.finish()
    for cuts in ([0, 4 * block, 8 * block, 16 * block, numel], [0, 1, 777, 5000, 5000, 13_333, numel]):
        cur = RecordCursor(pos, val, numel, esize, block, False, "t")
        got = old.copy()
        for start, stop in zip(cuts, cuts[1:]):
            words = got[start:stop]
            cur.apply(words, start, stop, coding)
        assert got.tobytes() == new.tobytes(), cuts
    with pytest.raises(ValueError, match="consecutive"):
        RecordCursor(pos, val, numel, esize, block, False, "t").apply(old.copy()[5:], 5, 10, coding)


def test_tensor_hash_follows_the_documented_byte_stream():
    t = torch.tensor([[1.0, -0.0, float("nan")]], dtype=torch.bfloat16)

    def s(x: str) -> bytes:
        return struct.pack("<I", len(x.encode())) + x.encode()

    stream = s("rlsubnet-tensor-v1") + s("w") + s("BF16") + struct.pack("<QQQ", 2, 1, 3) + bytes(t.view(torch.uint8).numpy())
    assert hash_tensor("w", t) == xxhash.xxh3_128(stream).hexdigest()
    combined = s("rlsubnet-checkpoint-v1") + struct.pack("<Q", 1) + s("w") + bytes.fromhex(hash_tensor("w", t))
    assert combine_hashes({"w": hash_tensor("w", t)}) == xxhash.xxh3_128(combined).hexdigest()
    # pinned: a change to the scheme must change HASH_SCHEME and the format version
    assert HASH_SCHEME == "xxh3-128-tensors-v1"
    assert hash_tensor("w", t) == "1683ec07587acd4216ccbc7e19fbdbfd"
    with pytest.raises(ValueError, match="not a xxh3-128-tensors-v1 digest"):
        combine_hashes({"w": "55398cb0465e5031aa28d191e084fc29309fcdde2da84fca2d1ba51afbb8bd9d"})  # a sha256


def test_checkpoint_hash_ignores_sharding_and_order_but_not_content(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"layer.{i}.weight": torch.randn(20, 10, generator=g).to(torch.bfloat16) for i in range(5)}
    save_state_dict(sd, tmp_path / "one")
    save_state_dict(dict(reversed(list(sd.items()))), tmp_path / "many", max_shard_bytes=500)
    one, many = hash_checkpoint(open_checkpoint(tmp_path / "one")), hash_checkpoint(open_checkpoint(tmp_path / "many"), threads=2)
    assert one == many == hash_state_dict(sd)
    assert hash_checkpoint(open_checkpoint(tmp_path / "many"), threads=1) == one
    renamed = {("x" + k): v for k, v in sd.items()}
    reshaped = {k: v.reshape(10, 20) for k, v in sd.items()}
    retyped = {k: v.view(torch.float16) for k, v in sd.items()}
    flipped = {k: v.clone() for k, v in sd.items()}
    flipped["layer.3.weight"].view(torch.int16)[7, 7] ^= 1
    digests = {hash_state_dict(x).digest for x in (sd, renamed, reshaped, retyped, flipped)}
    assert len(digests) == 5


def test_hasher_blocks_equal_whole():
    t = torch.randn(1000).to(torch.float16)
    h = TensorHasher("a", t.dtype, t.shape)
    for i in range(0, 1000, 333):
        h.update(t[i : i + 333])
    assert h.hexdigest() == hash_tensor("a", t)


def test_record_streams_exact_bytes():
    """The decompressed streams of a tiny tensor, byte for byte (the compressed bytes depend on libzstd)."""
    old = np.zeros(40, dtype=np.uint16)
    old[36] = 0x4000  # 2.0
    new = old.copy()
    new[[2, 3, 36, 39]] = [0x3F80, 0x0001, 0x4001, 0xBF80]  # 1.0, smallest subnormal, 2.0 + 1 ULP, -1.0
    comp = (zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=3))
    for coding, src, words in (("xor", None, [0x3F80, 0x0001, 0x0001, 0xBF80]), ("absolute", new, [0x3F80, 0x0001, 0x4001, 0xBF80])):
        enc = TensorEncoder(40, 2, comp, block_numel=16)
        enc.add_delta(0, old ^ new, src)  # coding blocks [0, 16), [16, 32), [32, 40)
        pos, val = (zstandard.ZstdDecompressor().decompressobj().decompress(f) for f in enc.finish())
        # block 0: 2 changes, 1-byte gaps 2 and 0; block 1: none; block 2: 2 of 8 (> 1/7): bitmap, bits 4 and 7
        assert pos == b"\x02\x01\x02\x00" + b"\x00" + b"\x02\x00" + bytes([0b10010000]), coding
        # values, byte planes per block: low bytes then high bytes
        lo, hi = bytes(w & 0xFF for w in words), bytes(w >> 8 for w in words)
        assert val == lo[:2] + hi[:2] + lo[2:] + hi[2:], coding
