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
