"""Helpers shared by tests (import as `from helpers import ...`; tests/ is on pythonpath)."""

from __future__ import annotations

import os

import torch


def load_dir(path) -> dict[str, torch.Tensor]:
    """Load a whole checkpoint folder with the safetensors library itself (an independent reader)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
