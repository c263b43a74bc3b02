"""Property-based tests of the patch codec and of hostile patch files.

- Round trips: arbitrary sorted positions (gaps at the 1/2/4-byte width limits, entries at coding-block
  boundaries, empty, sparse, dense and full blocks) and values of every word width come back bit for bit, through
  any cut of the element ranges.
- Arbitrary decoder input: whatever bytes a record's streams hold, decoding raises a PatchError or yields
  positions that are strictly increasing and inside the tensor, never another exception.
- Arbitrary damage to a real patch file (bit flips, inserted, deleted and overwritten bytes, truncation, appended
  garbage), and damage inside a record's streams with every hash re-computed (what a buggy writer or a forger
  produces): ``apply`` refuses with a one-line RlsubnetError, writing nothing, or rebuilds the exact target.
  Never a wrong tensor, never another exception type.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import examples
from patch.patch_helpers import assert_same_checkpoint, edge_pair, write_pair
from rlsubnet._bits import NUMPY_UINT as UINT_OF
from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.errors import RlsubnetError
from rlsubnet.patch import PatchFile, apply_patch_, apply_patches, write_patch
from rlsubnet.patch.codec import RecordCursor, TensorEncoder
from rlsubnet.patch.errors import PatchError
from rlsubnet.patch.format import END_MAGIC, FORMAT_VERSION, HEAD, MAGIC, TRAILER

WIDTH_LIMITS = [254, 255, 256, 257, 258, 65534, 65535, 65536, 65537]


@pytest.fixture(autouse=True)
def pipeline():
    """Once, not once per pipeline mode: the inputs here are tiny, so create and apply run inline anyway."""
    return "inline"


# ------------------------------------------------------------------------------------------------ round trips
@st.composite
def changes(draw):
    """(numel, block_numel, esize, sorted unique positions, nonzero XOR words at them, seed for the old words)."""
    esize = draw(st.sampled_from([1, 2, 4, 8]))
    block = draw(st.sampled_from([1, 7, 8, 64, 255, 256, 257, 258, 1000, 1 << 17]))
    gaps = draw(st.lists(st.one_of(st.integers(0, 8), st.sampled_from(WIDTH_LIMITS[:5]), st.integers(0, 3000)),
                         max_size=40))
    if block > 1 << 16:  # gaps at the two-byte limit: only a block this long holds them
        for g in draw(st.lists(st.sampled_from(WIDTH_LIMITS[5:]), max_size=2)):
            gaps.insert(draw(st.integers(0, len(gaps))), g)
    pos = list(np.cumsum(np.array(gaps, dtype=np.int64) + 1) - 1) if gaps else []
    # entries on and next to coding-block boundaries
    for k in draw(st.lists(st.integers(1, 4), max_size=3)):
        pos += [k * block - 1, k * block, k * block + 1]
    if draw(st.booleans()):  # one whole coding block changed (stored with no positions)
        k = draw(st.integers(0, 3))
        pos += list(range(k * block, (k + 1) * block)) if block <= 1000 else []
    pos = sorted(set(int(p) for p in pos))
    numel = (pos[-1] + 1 if pos else 0) + draw(st.integers(0, 2 * block if block <= 1000 else 300))
    numel = max(numel, 1)
    raw = draw(st.binary(min_size=len(pos) * esize, max_size=len(pos) * esize))
    words = np.frombuffer(raw, dtype=UINT_OF[esize]).copy()
    words[words == 0] = 1  # an XOR word of 0 is no change
    return numel, block, esize, np.array(pos, dtype=np.int64), words, draw(st.integers(0, 2**32 - 1))


def _cuts(draw, numel: int) -> list[int]:
    inner = draw(st.lists(st.integers(0, numel), max_size=5))
    return [0, *sorted(inner), numel]


@examples(150)
@given(case=changes(), coding=st.sampled_from(["xor", "absolute"]), data=st.data())
def test_codec_round_trip_is_bit_exact(case, coding, data):
    numel, block, esize, pos, words, seed = case
    kind = UINT_OF[esize]
    old = np.random.default_rng(seed).integers(0, np.iinfo(kind).max, numel, dtype=kind, endpoint=True)
    xor = np.zeros(numel, dtype=kind)
    xor[pos] = words
    new = old ^ xor
    comp = (zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=3))
    enc = TensorEncoder(numel, esize, comp, block)
    step = block * data.draw(st.integers(1, 3))  # the encoder takes whole coding blocks per call
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        enc.add_delta(start, xor[start:stop], new[start:stop] if coding == "absolute" else None)
    frames = enc.finish()
    assert enc.changed == len(pos)

    cur = RecordCursor(*frames, numel, esize, block, False, "t")
    got_pos, got_vals = [], []
    cuts = _cuts(data.draw, numel)
    for a, b in zip(cuts, cuts[1:]):
        p, v = cur.take(a, b)
        assert ((p >= a) & (p < b)).all()
        got_pos.append(p)
        got_vals.append(v)
    assert np.concatenate(got_pos).tolist() == pos.tolist()
    assert np.concatenate(got_vals).tobytes() == (words if coding == "xor" else new[pos]).tobytes()

    cur = RecordCursor(*frames, numel, esize, block, False, "t")
    out = old.copy()
    cuts = _cuts(data.draw, numel)
    for a, b in zip(cuts, cuts[1:]):
        cur.apply(out[a:b], a, b, coding)
    assert out.tobytes() == new.tobytes()


@examples(150)
@given(
    pos_raw=st.binary(max_size=48), val_raw=st.binary(max_size=96), numel=st.integers(1, 400),
    block=st.sampled_from([1, 3, 8, 16, 64, 1000]), esize=st.sampled_from([1, 2, 4, 8]), full=st.booleans(),
    pos_level=st.sampled_from([None, 1]),
)
def test_decoder_refuses_or_decodes_arbitrary_streams(pos_raw, val_raw, numel, block, esize, full, pos_level):
    """Any bytes as a record's positions and values streams (compressed as given, or sent raw: not zstd)."""
    def frame(raw):
        return zstandard.ZstdCompressor(level=pos_level).compress(raw) if pos_level else raw

    pos, val = frame(pos_raw), frame(val_raw)
    try:
        p, v = RecordCursor(pos, val, numel, esize, block, full, "t").take(0, numel)
    except PatchError as exc:
        assert "\n" not in str(exc)
        return
    assert len(p) == len(v) and v.dtype == UINT_OF[esize]
    assert (np.diff(p) > 0).all() and (len(p) == 0 or (p[0] >= 0 and p[-1] < numel))
    # apply() decodes the same record the same way
    words = np.zeros(numel, dtype=UINT_OF[esize])
    RecordCursor(pos, val, numel, esize, block, full, "t").apply(words, 0, numel, "absolute")
    expect = np.zeros(numel, dtype=UINT_OF[esize])
    expect[p] = v
    assert words.tobytes() == expect.tobytes()


# -------------------------------------------------------------------------------------------- damaged files
@pytest.fixture(scope="module")
def real_patch(tmp_path_factory):
    """A base folder, its tuned twin, and a patch between them (several tensors of three dtypes, small coding
    blocks so records hold gap, bitmap, empty and full blocks; an embedded config file)."""
    root = tmp_path_factory.mktemp("fuzz_patch")
    base, tuned = edge_pair(torch.bfloat16, seed=5)
    b32, t32 = edge_pair(torch.float32, seed=6)
    base.update({f"f32.{k}": v for k, v in b32.items()})
    tuned.update({f"f32.{k}": v for k, v in t32.items()})
    g = torch.Generator().manual_seed(7)
    h = torch.randn(300, generator=g).to(torch.float16)
    base["model.h"], tuned["model.h"] = h, torch.where(torch.rand(300, generator=g) < 0.05, h + 1, h)
    b, t = write_pair(root, base, tuned)
    (b / "config.json").write_text('{"a": 1}')
    (t / "config.json").write_text('{"a": 2, "tuned": true}')
    with open_checkpoint(b) as bc, open_checkpoint(t) as tc:
        write_patch(bc, tc, root / "p.rlpatch", block_numel=64)
    return b, t, root / "p.rlpatch", base, tuned


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _apply_or_refuse(b: Path, t: Path, patch_bytes: bytes, base: dict, tuned: dict) -> str:
    """Apply ``patch_bytes`` to the base folder and in place to a copy of the base tensors; check that each either
    refuses in one line, leaving nothing behind / the tensors as they were, or gives the target exactly."""
    outcome = []
    with tempfile.TemporaryDirectory(dir=b.parent) as tmp:
        tmp = Path(tmp)
        p = tmp / "x.rlpatch"
        p.write_bytes(patch_bytes)
        out = tmp / "out"
        try:
            apply_patches(b, [p], out)
        except RlsubnetError as exc:
            assert "\n" not in str(exc), str(exc)
            assert not out.exists() and [q.name for q in tmp.iterdir()] == ["x.rlpatch"]
            outcome.append("refused")
        else:
            assert_same_checkpoint(t, out)
            assert (out / "config.json").read_bytes() == (t / "config.json").read_bytes()
            outcome.append("exact")

        model = {n: v.clone() for n, v in base.items()}
        try:
            apply_patch_(model, p)
        except RlsubnetError as exc:
            assert "\n" not in str(exc), str(exc)
            assert all(_same_bits(model[n], base[n]) for n in base)
            outcome.append("refused")
        else:
            assert all(_same_bits(model[n], tuned[n]) for n in base)
            outcome.append("exact")
    return "/".join(outcome)


@st.composite
def damage(draw, size: int):
    """1-3 edits of a byte string of ``size`` bytes: (op, position, argument)."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        where = draw(st.one_of(st.integers(0, size - 1), st.integers(max(0, size - 80), size - 1),
                               st.integers(0, min(size - 1, 40))))  # anywhere, and often the head and trailer
        arg = draw(st.integers(1, 255)) if op in ("flip", "set") else draw(st.binary(min_size=1, max_size=16))
        ops.append((op, where, arg))
    return ops


def _edit(data: bytes, ops) -> bytes:
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


@examples(60)
@given(data=st.data())
def test_damaged_patch_file_is_refused_or_exact(real_patch, data):
    b, t, p, base, tuned = real_patch
    raw = p.read_bytes()
    damaged = _edit(raw, data.draw(damage(len(raw))))
    outcome = _apply_or_refuse(b, t, damaged, base, tuned)
    if damaged != raw:
        assert outcome == "refused/refused"  # every byte of the file is covered by a hash or a check


def _records(pf: PatchFile):
    """(entry, frames) of every record in file order: tensors' then embedded files'."""
    items = [e for e in pf.tensors if e.get("record")] + [f for f in pf.manifest.get("files") or [] if f.get("record")]
    items.sort(key=lambda e: e["record"]["offset"])
    return [(e, [bytes(f) for f in pf.read_record(e["record"], "fuzz")]) for e in items]


def reseal(pf: PatchFile, replace: dict[tuple[str, int], bytes]) -> bytes:
    """The patch file rebuilt with some frames replaced ((record name, frame index) -> bytes), every record
    hash, offset and size, the manifest hash and the trailer recomputed: damage that no hash reveals."""
    manifest = json.loads(json.dumps(pf.manifest))
    entries = {e["name"]: e for e in manifest["tensors"]} | {"file:" + f["name"]: f for f in manifest.get("files") or []}
    body = bytearray(HEAD.pack(MAGIC, FORMAT_VERSION, 0))
    for entry, frames in _records(pf):
        key = entry["name"] if "op" in entry else "file:" + entry["name"]
        frames = [replace.get((key, i), f) for i, f in enumerate(frames)]
        rec = entries[key]["record"]
        rec["offset"] = len(body)
        rec["nbytes"] = [len(f) for f in frames]
        rec["sha256"] = hashlib.sha256(b"".join(frames)).hexdigest()
        for f in frames:
            body += f
    frame = zstandard.ZstdCompressor(level=3).compress(json.dumps(manifest).encode())
    m_off = len(body)
    return bytes(body + frame + TRAILER.pack(m_off, len(frame), hashlib.sha256(frame).digest(), END_MAGIC))


def test_reseal_without_changes_applies(real_patch):
    """The re-sealing helper itself: with no frame replaced, the rebuilt patch applies exactly."""
    b, t, p, base, tuned = real_patch
    assert _apply_or_refuse(b, t, reseal(PatchFile.open(p), {}), base, tuned) == "exact/exact"


@examples(80)
@given(data=st.data())
def test_damage_inside_a_record_with_every_hash_recomputed_is_refused_or_exact(real_patch, data):
    """The streams decode to something else (or to garbage) while every record hash matches: only the target
    content hashes stand between the damage and the output, and they must hold."""
    b, t, p, base, tuned = real_patch
    pf = PatchFile.open(p)
    records = _records(pf)
    entry, frames = data.draw(st.sampled_from(records))
    i = data.draw(st.integers(0, len(frames) - 1))
    key = entry["name"] if "op" in entry else "file:" + entry["name"]
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(frames[i])
    if data.draw(st.booleans()) and plain:  # damage the decompressed stream, then compress it again
        new = zstandard.ZstdCompressor(level=3).compress(_edit(plain, data.draw(damage(len(plain)))))
    else:  # damage the compressed frame
        new = _edit(frames[i], data.draw(damage(len(frames[i]))))
    outcome = _apply_or_refuse(b, t, reseal(pf, {(key, i): new}), base, tuned)
    if new == frames[i]:
        assert outcome == "exact/exact"
