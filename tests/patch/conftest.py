"""Fixtures for the patch tests: tiny, deliberately sharded checkpoint pairs."""

from __future__ import annotations

import pytest
import torch

from patch.patch_helpers import edge_pair, write_pair


@pytest.fixture
def bf16_pair(tmp_path):
    base, tuned = edge_pair(torch.bfloat16)
    return write_pair(tmp_path, base, tuned)
