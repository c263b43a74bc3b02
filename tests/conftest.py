"""Shared fixtures: tiny checkpoints built offline, deliberately split into several shards."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, Phase, settings

from rlsubnet.testing import llama_specs, write_synthetic_pair

# Property-based tests: the same examples on every run and machine (derandomize), no wall-clock deadline (the
# machine may be shared and loaded), and no example database (no run depends on an earlier one). Each fuzz test
# sets its own max_examples (tests/fuzzing.py); RLSUBNET_FUZZ_SCALE multiplies them for a longer search by hand.
settings.register_profile(
    "rlsubnet",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# `make mutate`: a failing example is enough to kill a mutant; shrinking it would only cost time.
settings.register_profile(
    "mutation", parent=settings.get_profile("rlsubnet"), phases=[Phase.explicit, Phase.reuse, Phase.generate]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rlsubnet"))

SMALL_SHARD = 16 << 10  # 16 KiB: the tiny model below spans several shards


@pytest.fixture
def tiny_specs():
    return llama_specs(layers=3, hidden=32, intermediate=64, vocab=48)


@pytest.fixture
def sharded_pair(tmp_path, tiny_specs):
    """(base_dir, tuned_dir, changed_at_0, specs) for a sharded bf16 pair with 20% of entries one ULP apart."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    changed = write_synthetic_pair(base, tuned, specs=tiny_specs, density=0.2, seed=1, max_shard_bytes=SMALL_SHARD)
    return base, tuned, changed, tiny_specs
