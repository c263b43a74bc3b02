"""Aligned flat blocks of one base and N other checkpoints: the reading loop of every streaming pass.

compare, mask build, overlap's magnitude buckets, patch create and patch apply all visit tensors in an order
the caller gives, read each one in flat blocks (the same element range from every checkpoint that holds it)
and hand the blocks to a consumer. This module does that once:

- a background thread reads the next blocks while the consumer works on the current ones (reads go through
  ``preadv`` straight into the buffers; reads and hashing release the GIL, so both cores work);
- buffers come from one :class:`~rlsubnet._threads.BufferPool` and go back when the consumer releases a
  block (or later: patch apply hands them on to its writer thread, which gives them back);
- a checkpoint's tensors may be hashed as they are read (:class:`~rlsubnet.checkpoint.hashing.TensorHasher`),
  or read only to be hashed (a tensor the consumer does not need but whose hash must be checked);
- an optional progress bar counts the bytes read.

Memory: the buffers of the blocks in flight (being read, queued, being consumed), whatever the model size.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlsubnet._bits import as_tensor, words
from rlsubnet._threads import BufferPool, prefetch
from rlsubnet.checkpoint.hashing import TensorHasher
from rlsubnet.checkpoint.index import element_size
from rlsubnet.checkpoint.reader import Checkpoint

BLOCK_BYTES = 16 << 20  # per checkpoint and block: large enough to read at disk speed, small enough to cache


def block_numel(block_bytes: int, itemsize: int, multiple: int = 1) -> int:
    """Elements per block: ``block_bytes`` worth of ``itemsize``-byte elements, rounded down to a multiple of
    ``multiple`` (and at least one multiple)."""
    return multiple * max(1, (block_bytes // itemsize) // multiple)


@dataclass
class Item:
    """One tensor to stream.

    ``read``: indices of the checkpoints whose blocks are handed to the consumer, in that order (each read with
    its own stored dtype; all hold ``numel`` elements). ``hash``: indices of the checkpoints whose tensor is
    hashed; one that is hashed but not read is read first, in blocks, only to hash it. ``step``: elements per
    block. ``tag``: anything of the caller's (its plan for the tensor).
    """

    name: str
    numel: int
    step: int
    read: tuple[int, ...] = (0,)
    hash: tuple[int, ...] = ()
    tag: Any = None


@dataclass
class Block:
    """Elements [start, stop) of one tensor from each checkpoint it is read from (``raw``: the bytes, views of
    pooled ``buffers``). The last block of a tensor carries the hashes of the hashed checkpoints in ``digests``.
    A tensor always yields at least one block, an empty one for a tensor of no elements."""

    item: Item
    start: int
    stop: int
    raw: list[np.ndarray]
    dtypes: list[torch.dtype]
    buffers: list[np.ndarray]
    digests: dict[int, str] = field(default_factory=dict)

    @property
    def last(self) -> bool:
        return self.stop >= self.item.numel

    @property
    def nbytes(self) -> int:
        return sum(len(r) for r in self.raw)

    def tensors(self) -> list[torch.Tensor]:
        """The blocks as 1-D tensors in their stored dtypes (views: release the block only after their last use)."""
        return [as_tensor(r, d) for r, d in zip(self.raw, self.dtypes)]

    def words(self) -> list[np.ndarray]:
        """The blocks as unsigned integer words of their element width (views)."""
        return [words(r, element_size(d)) for r, d in zip(self.raw, self.dtypes)]


class BlockStream:
    """Iterate :class:`Block` objects over ``items``, reading from ``checkpoints`` (index 0 is the base; an entry
    may be None when no item reads it).

    ``depth``: blocks read ahead by the background thread (0: read in the consumer's thread, for inputs too
    small for a thread to pay off). ``block_bytes``: the block size for checkpoints read only to be hashed.
    ``buffer_bytes``: size of the pooled buffers (default: the largest block of any item); ``keep``: how many
    free ones the pool holds on to (default: enough for the blocks in flight). ``progress``: a
    label for a progress bar over the bytes read (None: no bar). Call :meth:`release` with each block once its
    data is no longer needed, or give its buffers back to :attr:`pool` yourself.

    >>> stream = BlockStream([base, tuned], [Item(n, numel, step, read=(0, 1)) for ...])
    >>> with stream as blocks:          # leaving the block, even by an exception, stops the reader thread
    ...     for block in blocks:
    ...         b, t = block.tensors(); ...; stream.release(block)
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint | None],
        items: Sequence[Item],
        *,
        depth: int = 1,
        block_bytes: int = BLOCK_BYTES,
        buffer_bytes: int | None = None,
        keep: int | None = None,
        progress: str | None = None,
    ):
        self.checkpoints = list(checkpoints)
        self.items = list(items)
        self.depth = depth
        self.block_bytes = block_bytes
        if buffer_bytes is None:
            buffer_bytes = max((it.step * self._itemsize(it) for it in self.items), default=block_bytes)
        if keep is None:  # a buffer per checkpoint for each block in flight: read, queued, consumed
            keep = (depth + 2) * max((len(it.read) for it in self.items), default=1)
        self.pool = BufferPool(buffer_bytes, keep=keep)
        self.progress = progress

    def _checkpoint(self, side: int) -> Checkpoint:
        ck = self.checkpoints[side]
        if ck is None:
            raise ValueError(f"checkpoint {side} of the stream is None, yet an item reads or hashes it")
        return ck

    def _info(self, side: int, name: str):
        return self._checkpoint(side).infos[name]

    def _itemsize(self, item: Item) -> int:
        return max((element_size(self._info(s, item.name).dtype) for s in item.read), default=1)

    def total_bytes(self) -> int:
        """Bytes the stream reads: every read and every hashed checkpoint's copy of each item."""
        return sum(self._info(s, it.name).nbytes for it in self.items for s in {*it.read, *it.hash})

    def release(self, block: Block) -> None:
        self.pool.give(*block.buffers)

    def _hash_only(self, side: int, name: str, hasher: TensorHasher) -> None:
        ck, info = self._checkpoint(side), self._info(side, name)
        esize = element_size(info.dtype)
        step = block_numel(self.block_bytes, esize)
        for start in range(0, info.numel, step):
            stop = min(info.numel, start + step)
            buf = self.pool.get((stop - start) * esize)
            hasher.update(ck.read_flat_into(name, start, stop, buf))
            self.pool.give(buf)

    def _read(self) -> Iterator[Block]:
        for item in self.items:
            hashers = {}
            for s in item.hash:
                info = self._info(s, item.name)
                hashers[s] = TensorHasher(item.name, info.dtype, info.shape)
                if s not in item.read:
                    self._hash_only(s, item.name, hashers[s])
            dtypes = [self._info(s, item.name).dtype for s in item.read]
            sizes = [element_size(d) for d in dtypes]
            for start in range(0, max(item.numel, 1), item.step):
                stop = min(item.numel, start + item.step)
                bufs, raw = [], []
                for s, esize in zip(item.read, sizes):
                    nbytes = (stop - start) * esize
                    buf = self.pool.get(nbytes)
                    if nbytes:
                        self._checkpoint(s).read_flat_into(item.name, start, stop, buf)
                    data = buf[:nbytes]
                    if s in hashers:
                        hashers[s].update(data)
                    bufs.append(buf)
                    raw.append(data)
                block = Block(item, start, stop, raw, dtypes, bufs)
                if block.last:
                    block.digests = {s: h.hexdigest() for s, h in hashers.items()}
                yield block

    def __enter__(self) -> Generator[Block, None, None]:
        self._blocks = iter(self)
        return self._blocks

    def __exit__(self, *exc) -> None:
        self._blocks.close()

    def __iter__(self) -> Generator[Block, None, None]:
        blocks = prefetch(self._read(), depth=self.depth) if self.depth else self._read()
        if self.progress is None:
            yield from blocks
            return
        from tqdm import tqdm  # ~0.2 s to import: only when a bar is shown

        bar = tqdm(total=self.total_bytes(), unit="B", unit_scale=True, desc=self.progress, delay=1.0, leave=False)
        try:
            for block in blocks:
                yield block
                # after the consumer is done with it; a tensor read only to be hashed counts with its first block
                hashed = sum(self._info(s, block.item.name).nbytes for s in block.item.hash if s not in block.item.read)
                bar.update(block.nbytes + (hashed if block.start == 0 else 0))
        finally:
            bar.close()
