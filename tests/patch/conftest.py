"""Fixtures for the patch tests: tiny, deliberately sharded checkpoint pairs."""

from __future__ import annotations

import pytest
import torch

from patch.patch_helpers import edge_pair, write_pair


@pytest.fixture
def bf16_pair(tmp_path):
    base, tuned = edge_pair(torch.bfloat16)
    return write_pair(tmp_path, base, tuned)


@pytest.fixture(autouse=True, params=["threaded", "inline"])
def pipeline(request, monkeypatch):
    """Run every patch test both ways: through the threaded pipeline (reader, decoder, zstd and writer threads,
    O_DIRECT output), which create and apply use above THREADS_FROM_BYTES, and in one thread, as they do for
    small checkpoints like these."""
    from rlsubnet.patch import apply as apply_mod
    from rlsubnet.patch import encode as encode_mod

    limit = -1 if request.param == "threaded" else 1 << 62
    monkeypatch.setattr(apply_mod, "THREADS_FROM_BYTES", limit)
    monkeypatch.setattr(encode_mod, "THREADS_FROM_BYTES", limit)
    return request.param
