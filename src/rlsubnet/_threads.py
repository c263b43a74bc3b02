"""The threads of the streaming passes: a producer run ahead in the background, recycled block buffers, and the
pool that reduces a block's pieces in parallel."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Iterate ``it`` in a background thread, ``depth`` items ahead; its exceptions re-raise in the consumer.

    Reads (``preadv``), hashing, numpy and zstd release the GIL, so on two cores the producer's work runs
    alongside the consumer's. Memory: ``depth`` items queued plus one being made and one being consumed.
    Leaving the loop early (break, an exception, closing the generator) stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put((None, exc))
            return
        q.put((done, None))

    thread = threading.Thread(target=worker, daemon=True, name="rlsubnet-prefetch")
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


class BufferPool:
    """Recycled byte buffers of ``nbytes`` each, shared by the threads of one streaming pass.

    Fresh memory costs a page fault per 4 KiB page on first touch (on this kind of VM that was half the system
    time of a compare, and 0.3-1 GB of faults per `patch create` of a 1 GiB pair); cycling a few block-sized
    buffers pays that once. :meth:`get` never blocks: it reuses a free buffer or allocates one, so a consumer
    that stops early cannot stall a producer; how many are in flight is bounded by the queues between the
    threads, not here. :meth:`give` keeps at most ``keep`` free buffers. ``deque`` appends and pops are
    atomic, so no lock is needed.
    """

    def __init__(self, nbytes: int, keep: int = 8):
        self.nbytes, self.keep = max(1, int(nbytes)), keep
        self._free: deque[np.ndarray] = deque()

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` (the whole buffer: slice what you use, give back this one)."""
        if nbytes > self.nbytes:
            return np.empty(nbytes, dtype=np.uint8)  # larger than planned: not kept
        try:
            return self._free.pop()
        except IndexError:
            return np.empty(self.nbytes, dtype=np.uint8)

    def give(self, *bufs: np.ndarray | None) -> None:
        for buf in bufs:
            if buf is not None and len(buf) == self.nbytes and len(self._free) < self.keep:
                self._free.append(buf)


_POOL: ThreadPoolExecutor | None = None


def worker_pool() -> ThreadPoolExecutor:
    """The shared pool that reduces sub-blocks in parallel (numpy and torch release the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="rlsubnet-diff")
    return _POOL


def map_pieces(fn, n: int, piece: int) -> list:
    """``fn(start)`` for every piece of ``piece`` elements of ``n``, in order: on :func:`worker_pool` when there
    are several, inline for one (no piece at all when ``n`` is 0)."""
    starts = range(0, n, piece)
    if len(starts) > 1:
        return list(worker_pool().map(fn, starts))
    return [fn(0)] if n else []


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on ``n`` intra-op threads inside the block (the count before is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded_torch():
    """Run torch ops single-threaded inside the block (restored after): our pool provides the parallelism, and
    torch's intra-op threads spin badly when they compete with it or with another busy process."""
    return torch_threads(1)
