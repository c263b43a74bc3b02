"""rlsubnet.checkpoint.stream: aligned blocks of several checkpoints, hashes as they stream, recycled buffers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rlsubnet._threads import BufferPool
from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.checkpoint.hashing import hash_checkpoint
from rlsubnet.checkpoint.stream import BlockStream, Item, block_numel


def _items(ck, step, **kw):
    return [Item(n, ck.infos[n].numel, step, **kw) for n in ck.names()]


def _collect(stream):
    got = {}
    with stream as blocks:
        for block in blocks:
            parts = got.setdefault(block.item.name, [])
            parts.append((block.start, block.stop, [t.clone() for t in block.tensors()], block.last, dict(block.digests)))
            stream.release(block)
    return got


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_blocks_of_every_side_cover_each_tensor_in_order(sharded_pair, depth):
    base, tuned, _, _ = sharded_pair
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        got = _collect(BlockStream([b, t], _items(b, 100, read=(0, 1)), depth=depth))
        assert list(got) == b.names()
        for name, parts in got.items():
            assert [p[0] for p in parts] == list(range(0, b.infos[name].numel, 100))
            assert [p[3] for p in parts] == [False] * (len(parts) - 1) + [True]
            for side, ck in enumerate((b, t)):
                joined = torch.cat([p[2][side] for p in parts])
                assert torch.equal(joined.view(torch.int16), ck.read(name).reshape(-1).view(torch.int16))


def test_streamed_hashes_are_the_checkpoint_hashes(sharded_pair):
    base, tuned, _, _ = sharded_pair
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        want_b, want_t = hash_checkpoint(b).tensors, hash_checkpoint(t).tensors
        # side 0 hashed from the blocks it reads, side 1 read only to be hashed (in blocks of 64 bytes)
        stream = BlockStream([b, t], _items(b, 300, read=(0,), hash=(0, 1)), block_bytes=64)
        got = _collect(stream)
        for name, parts in got.items():
            assert [p[4] for p in parts[:-1]] == [{}] * (len(parts) - 1)  # digests come with the last block only
            assert parts[-1][4] == {0: want_b[name], 1: want_t[name]}
        # the bytes read only to hash count in the total, once per tensor
        assert stream.total_bytes() == b.nbytes + t.nbytes


def test_a_tensor_of_no_elements_yields_one_empty_block():
    ck = open_checkpoint({"e": torch.empty(0, 3, dtype=torch.bfloat16), "w": torch.ones(5)})
    got = _collect(BlockStream([ck], _items(ck, 2, hash=(0,))))
    (start, stop, (t,), last, digests), = got["e"]
    assert (start, stop, last, t.numel(), t.dtype) == (0, 0, True, 0, torch.bfloat16)
    assert digests == {0: hash_checkpoint(ck).tensors["e"]}
    assert [p[:2] for p in got["w"]] == [(0, 2), (2, 4), (4, 5)]


def test_items_read_from_no_checkpoint_still_give_the_block_ranges():
    ck = open_checkpoint({"w": torch.ones(10)})
    got = _collect(BlockStream([ck], [Item("w", 10, 4, read=())]))
    assert [(p[0], p[1], p[2]) for p in got["w"]] == [(0, 4, []), (4, 8, []), (8, 10, [])]


def test_buffers_are_recycled_not_allocated_per_block():
    ck = open_checkpoint({f"w{i}": torch.arange(1000, dtype=torch.float32) for i in range(20)})
    stream = BlockStream([ck], _items(ck, 100), depth=1)
    seen, blocks_seen = set(), 0
    with stream as blocks:
        for block in blocks:
            seen.add(id(block.buffers[0]))
            blocks_seen += 1
            stream.release(block)
    assert blocks_seen == 200 and len(seen) <= stream.pool.keep + 2


def test_leaving_early_stops_the_reader_thread():
    ck = open_checkpoint({f"w{i}": torch.ones(1000) for i in range(200)})
    stream = BlockStream([ck], _items(ck, 10), depth=2)
    with pytest.raises(RuntimeError, match="stop here"):
        with stream as blocks:
            for i, block in enumerate(blocks):
                if i == 3:
                    raise RuntimeError("stop here")
    deadline = time.monotonic() + 5
    while any(t.name == "rlsubnet-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "rlsubnet-prefetch"]


def test_block_numel_rounds_down_to_whole_multiples_and_never_to_zero():
    assert block_numel(16 << 20, 2) == 8 << 20
    assert block_numel(100, 2, 8) == 48
    assert block_numel(3, 4) == 1  # an element larger than the budget: one at a time
    assert block_numel(3, 4, 8) == 8  # at least one whole multiple
    assert block_numel(1000, 1, 300) == 900


def test_buffer_pool_reuses_its_size_and_keeps_at_most_keep():
    pool = BufferPool(64, keep=2)
    a, b, c = pool.get(10), pool.get(64), pool.get(64)
    assert len(a) == len(b) == 64
    big = pool.get(65)
    assert len(big) == 65
    pool.give(a, b, c, big, None)
    assert pool.get(1) is b and pool.get(1) is a  # the last one given first; c was not kept (keep=2)
    assert not np.shares_memory(pool.get(1), c)
