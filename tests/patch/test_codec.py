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
from rlsubnet.patch.errors import PatchError


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


@pytest.mark.parametrize("gap", [254, 255, 256, 257, 258])
def test_gap_width_at_the_one_byte_limit(gap):
    """A gap of 255 is the widest a one-byte gap holds; 256 needs two bytes. Positions [3, 3 + gap + 1] must
    decode as themselves (a gap of 256 written in one byte would come back as 0: [3, 4])."""
    from rlsubnet.patch.codec import _Stream, decode_positions

    block = 1000
    rel = np.array([3, 3 + gap + 1])
    record = encode_positions(rel, block)
    width = 1 if gap <= 255 else 2
    gaps = [3, gap]
    planes = bytes(g & 0xFF for g in gaps) + (bytes(g >> 8 for g in gaps) if width == 2 else b"")
    assert record == b"\x02" + bytes([width]) + planes
    frame = zstandard.ZstdCompressor().compress(record)
    assert decode_positions(_Stream(frame, "t"), block).tolist() == rel.tolist()
    # and through the encoder and cursor, in every word width
    for esize, kind in ((1, np.uint8), (2, np.uint16), (4, np.uint32), (8, np.uint64)):
        xor = np.zeros(block, dtype=kind)
        xor[rel] = [0x5A, 0xA5]
        comp = (zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=3))
        enc = TensorEncoder(block, esize, comp, block)
        enc.add_delta(0, xor, None)
        pos, vals = RecordCursor(*enc.finish(), block, esize, block, False, "t").take(0, block)
        assert pos.tolist() == rel.tolist() and vals.tolist() == [0x5A, 0xA5], esize


def test_gap_width_at_the_two_byte_limit():
    from rlsubnet.patch.codec import _Stream, decode_positions

    block = 1 << 17
    for gap, width in ((65535, 2), (65536, 4), (65537, 4)):
        rel = np.array([0, gap + 1])
        record = encode_positions(rel, block)
        assert record[:2] == bytes([2, width]), gap
        frame = zstandard.ZstdCompressor().compress(record)
        assert decode_positions(_Stream(frame, "t"), block).tolist() == rel.tolist(), gap


def test_bitmap_only_above_one_seventh():
    """Exactly 1/7 of a block changed keeps the gap coding; one more change switches to the bitmap (the
    documented rule: a bitmap when count * 7 > block length), in encode_positions and in the encoder alike."""
    from rlsubnet.patch.codec import BITMAP_RATIO

    block = 14
    two, three = np.array([1, 9]), np.array([1, 5, 9])
    assert len(two) * BITMAP_RATIO == block
    assert encode_positions(two, block) == b"\x02\x01" + bytes([1, 7])
    assert encode_positions(three, block) == b"\x03\x00" + bytes([0b00100010, 0b00000010])
    for rel, record in ((two, b"\x02\x01" + bytes([1, 7])), (three, b"\x03\x00" + bytes([0b00100010, 0b00000010]))):
        xor = np.zeros(block, dtype=np.uint8)
        xor[rel] = 1
        enc = TensorEncoder(block, 1, (zstandard.ZstdCompressor(), zstandard.ZstdCompressor()), block)
        enc.add_delta(0, xor, None)
        pos, _ = enc.finish()
        assert zstandard.ZstdDecompressor().decompressobj().decompress(pos) == record


def test_encoder_bookkeeping_and_empty_frames():
    comp = (zstandard.ZstdCompressor(), zstandard.ZstdCompressor())
    # nothing changed: no frames at all (the patch then stores no record)
    enc = TensorEncoder(100, 2, comp, 16)
    enc.add_delta(0, np.zeros(100, dtype=np.uint16), None)
    assert enc.finish() == (b"", b"") and enc.changed == 0
    # a tensor stored whole, in two calls: every element counted, and no positions frame
    words = np.arange(100, dtype=np.uint16)
    enc = TensorEncoder(100, 2, comp, 16, full=True)
    enc.add_full(0, words[:64])
    enc.add_full(64, words[64:])
    pos, val = enc.finish()
    assert enc.changed == 100 and pos == b""
    assert RecordCursor(pos, val, 100, 2, 16, True, "t").take(0, 100)[1].tolist() == words.tolist()
    # blocks must be consecutive and whole coding blocks; every element must be encoded
    enc = TensorEncoder(100, 2, comp, 16)
    with pytest.raises(ValueError, match="consecutive and whole coding blocks"):
        enc.add_delta(16, np.zeros(16, dtype=np.uint16), None)  # skips [0, 16)
    with pytest.raises(ValueError, match="consecutive and whole coding blocks"):
        enc.add_delta(0, np.zeros(10, dtype=np.uint16), None)  # not a whole coding block
    enc.add_delta(0, np.zeros(32, dtype=np.uint16), None)
    with pytest.raises(ValueError, match="only 32 of 100 elements were encoded"):
        enc.finish()


def test_byte_planes_never_alias_the_input():
    """planes() returns new memory for every width, one-byte words included: the encoder reuses its buffers while
    the compression of the previous block may still be reading the planes."""
    from rlsubnet.patch.codec import planes

    for kind in (np.uint8, np.uint16, np.uint32, np.uint64):
        words = np.arange(1, 9, dtype=kind)
        out = planes(words)
        before = out.copy()
        words[:] = 0
        assert out.tobytes() == before.tobytes() and not np.shares_memory(out, words), kind


def test_stream_errors_name_the_stream():
    """A damaged positions or values stream is refused naming the tensor and the stream; data after the last
    block, and a frame cut short after the data a block needed, are refused too."""
    block, numel = 16, 32
    xor = np.zeros(numel, dtype=np.uint16)
    xor[[3, 20]] = 7
    enc = TensorEncoder(numel, 2, (zstandard.ZstdCompressor(), zstandard.ZstdCompressor()), block)
    enc.add_delta(0, xor, None)
    pos, val = enc.finish()
    plain_pos = zstandard.ZstdDecompressor().decompressobj().decompress(pos)
    plain_val = zstandard.ZstdDecompressor().decompressobj().decompress(val)
    compress = zstandard.ZstdCompressor().compress

    def decode(p, v):
        return RecordCursor(p, v, numel, 2, block, False, "w").take(0, numel)

    assert decode(pos, val)[0].tolist() == [3, 20]
    with pytest.raises(PatchError, match=r"^w \(positions\): unexpected data after the last block"):
        decode(compress(plain_pos + b"\x00"), val)
    with pytest.raises(PatchError, match=r"^w \(values\): unexpected data after the last block"):
        decode(pos, compress(plain_val + b"\x01\x02"))
    with pytest.raises(PatchError, match=r"^w \(values\): stream ends early"):
        decode(pos, compress(plain_val[:-1]))
    with pytest.raises(PatchError, match=r"^w \(positions\): cannot decompress"):
        decode(b"\0" * 16, val)
    # a frame whose end is damaged after the last byte a block needed: only the end-of-stream check sees it
    big = zstandard.ZstdCompressor(write_checksum=True).compress(plain_pos)
    damaged = big[:-1] + bytes([big[-1] ^ 0xFF])  # the content checksum
    with pytest.raises(PatchError, match=r"^w \(positions\): cannot decompress"):
        decode(damaged, val)
    # bytes after the frame that are no zstd frame: every block decodes, the end-of-stream check refuses them
    with pytest.raises(PatchError, match=r"^w \(values\): cannot decompress \(.*Unknown frame descriptor"):
        decode(pos, val + b"junkjunk")


@pytest.mark.parametrize("record,needle", [
    (b"\x0b", "block claims 11 changes in 10 elements"),
    (b"\x02\x00" + bytes([0b00000001, 0b00000000]), "bitmap holds 1 changes, header says 2"),
    (b"\x02\x03" + bytes([1, 2, 3, 4, 5, 6]), "unknown position mode 3"),
    (b"\x02\x01" + bytes([3, 5]), "position 9 past a 9-element block"),  # the last position is the block length
    (b"\x02\x01" + bytes([3, 200]), "position 204 past a 9-element block"),
    (b"\x03\x01" + bytes([0, 0, 200]), "position 202 past a 9-element block"),  # the last one is named
    (b"\xff" * 12, "malformed count"),
])
def test_malformed_position_records_are_refused_by_name(record, needle):
    from rlsubnet.patch.codec import _Stream, decode_positions

    block = 10 if needle.startswith(("block", "bitmap", "unknown")) else 9
    frame = zstandard.ZstdCompressor().compress(record)
    with pytest.raises(PatchError, match=rf"^t \(positions\): {needle} \(corrupt patch\)$"):
        decode_positions(_Stream(frame, "t (positions)"), block)


def test_bitmap_padding_bits_are_not_positions():
    """A 10-element block's bitmap has 6 padding bits; set ones there are not changes past the block."""
    from rlsubnet.patch.codec import _Stream, decode_positions

    record = b"\x01\x00" + bytes([0b00000001, 0b00010000])  # bit 0, and bit 12: padding
    assert decode_positions(_Stream(zstandard.ZstdCompressor().compress(record), "t"), 10).tolist() == [0]


def test_join_planes_refuses_a_partial_word():
    with pytest.raises(ValueError, match="^3 bytes are not a whole number of 2-byte words$"):
        join_planes(b"abc", 2)
    comp = (zstandard.ZstdCompressor(), zstandard.ZstdCompressor())
    with pytest.raises(ValueError, match=r"\(got \[0, 10\)\)$"):
        TensorEncoder(100, 2, comp, 16).add_delta(0, np.zeros(10, dtype=np.uint16), None)


def test_cursor_mode_names_how_stored_words_act():
    """"xor" words are XORed into the old bits; absolute values and full tensors replace them ("set")."""
    words = (b"", b"")
    assert RecordCursor(*words, 4, 2, 4, False, "t").mode("xor") == "xor"
    assert RecordCursor(*words, 4, 2, 4, False, "t").mode("absolute") == "set"
    assert RecordCursor(*words, 4, 2, 4, True, "t").mode("xor") == "set"


def test_stream_reads_are_exact_from_a_source_that_returns_less():
    """A decompressor may hand out fewer bytes than asked: reads gather exactly n bytes, over as many chunks as it
    takes, and a source that runs dry first is refused naming the stream."""
    from rlsubnet.patch.codec import _Stream

    class Trickle:  # at most 3 bytes per read, like a decompressor at a block boundary
        def __init__(self, data: bytes):
            self.data, self.at = data, 0

        def read(self, n: int) -> bytes:
            c = self.data[self.at : self.at + min(n, 3)]
            self.at += len(c)
            return c

    s = _Stream(zstandard.ZstdCompressor().compress(b""), "t (values)")
    s._r = Trickle(bytes(range(20)))
    assert s.read(0) == b""
    assert s.read(7) == bytes(range(7))  # three chunks: 3, 3, 1
    assert s.read(5) == bytes(range(7, 12))  # two chunks: 3, 2
    assert s.read(2) == bytes([12, 13])  # one chunk
    with pytest.raises(PatchError, match=r"^t \(values\): stream ends early \(corrupt patch\)$"):
        s.read(7)  # 6 bytes left


def test_counts_take_up_to_ten_varint_bytes():
    """A count is any unsigned 64-bit value, ten varint bytes at most; an eleventh is malformed."""
    from rlsubnet.patch.codec import _Stream

    compress = zstandard.ZstdCompressor().compress
    top = (1 << 64) - 1
    assert len(varint(top)) == 10
    assert _Stream(compress(varint(top) + varint(5)), "t").varint() == top
    with pytest.raises(PatchError, match=r"^t: malformed count \(corrupt patch\)$"):
        _Stream(compress(b"\xff" * 10 + b"\x01"), "t").varint()
