"""Run a producer a few items ahead in a background thread, so reading overlaps with the consumer's work."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


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


class BufferRing:
    """A fixed set of reusable byte buffers, for a producer that fills them and a consumer that hands them back.

    Fresh memory costs a page fault per 4 KiB page on first touch (on this kind of VM that was half the
    system time of a compare); cycling a few block-sized buffers pays that once. :meth:`get` waits for a
    buffer to come back; after :meth:`close` it raises, so a producer blocked on it ends when the consumer stops.
    """

    def __init__(self, count: int, factory):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(factory())
        self._closed = threading.Event()

    def get(self):
        while True:
            if self._closed.is_set():
                raise RuntimeError("buffer ring closed")
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def put(self, buf) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._closed.set()
