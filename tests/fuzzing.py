"""Shared pieces of the property-based (Hypothesis) tests; the settings profile is registered in conftest.py."""

from __future__ import annotations

import os

from hypothesis import settings


def examples(n: int) -> settings:
    """``@examples(n)``: run n examples, times RLSUBNET_FUZZ_SCALE (default 1) for a longer search by hand.

    The counts are chosen so that every fuzz test together stays well under a minute on a loaded 2-core
    machine; docs/development.md lists them."""
    scale = float(os.environ.get("RLSUBNET_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(n * scale)))
