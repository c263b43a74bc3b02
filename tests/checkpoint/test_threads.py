"""rlsubnet._threads.prefetch: order, errors re-raised in the consumer, early exit stops the producer."""

from __future__ import annotations

import threading
import time

import pytest

from rlsubnet._threads import prefetch


def test_prefetch_keeps_order_and_runs_ahead_in_another_thread():
    seen = []

    def produce():
        for i in range(50):
            seen.append(threading.current_thread().name)
            yield i

    assert list(prefetch(produce(), depth=3)) == list(range(50))
    assert set(seen) == {"rlsubnet-prefetch"}


def test_prefetch_reraises_the_producers_error():
    def produce():
        yield 1
        raise KeyError("boom")

    it = prefetch(produce())
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)


def test_leaving_early_stops_the_producer():
    made = []

    def produce():
        for i in range(1000):
            made.append(i)
            yield i

    it = prefetch(produce(), depth=2)
    for i in it:
        if i == 3:
            break
    it.close()
    time.sleep(0.05)
    n = len(made)
    time.sleep(0.05)
    assert len(made) == n < 10  # stopped, a few items ahead at most
    assert not [t for t in threading.enumerate() if t.name == "rlsubnet-prefetch"]
