"""Random masks of matched density: exact counts, reproducible, uniform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsubnet.errors import UsageError
from rlsubnet.masks import Mask, random_mask
from rlsubnet.masks.random import CHUNK, split_count


@pytest.fixture
def reference():
    g = torch.Generator().manual_seed(0)
    return Mask.from_bool({
        "model.layers.0.mlp.up_proj.weight": torch.rand(64, 48, generator=g) < 0.3,
        "model.layers.0.input_layernorm.weight": torch.zeros(48, dtype=torch.bool),
        "model.layers.1.mlp.down_proj.weight": torch.rand(48, 64, generator=g) < 0.05,
        "odd": torch.rand(13, generator=g) < 0.5,
    }, {"atol": 1e-5, "dtype": "bf16"})


def test_per_tensor_matches_every_count(reference):
    r = random_mask(reference, scope="per_tensor", seed=1)
    assert r.counts == reference.counts
    assert r != reference
    assert r.kind == "random" and r.meta["extra"]["random"]["scope"] == "per_tensor"
    assert r.meta["extra"]["random"]["seed"] == 1
    assert r.meta["extra"]["operands"][0]["bits_sha256"] == reference.bits_sha256()
    assert r.atol == reference.atol and r.dtype == reference.dtype


def test_global_matches_the_total_only(reference):
    r = random_mask(reference, scope="global", seed=1)
    assert r.changed == reference.changed
    assert r.count("model.layers.0.input_layernorm.weight") > 0  # global scope spreads into the norm
    assert r.counts != reference.counts


def test_seeded_and_reproducible(reference):
    for scope in ("per_tensor", "global"):
        assert random_mask(reference, scope=scope, seed=7) == random_mask(reference, scope=scope, seed=7)
        assert random_mask(reference, scope=scope, seed=7) != random_mask(reference, scope=scope, seed=8)
    # per tensor, a tensor's bits do not depend on the other tensors
    r = random_mask(reference, scope="per_tensor", seed=3)
    alone = random_mask(
        Mask.from_bool({"odd": reference.tensor("odd")}), scope="per_tensor", seed=3
    )
    assert np.array_equal(alone.packed("odd"), r.packed("odd"))


def test_explicit_density_and_bad_arguments():
    r = random_mask({"a": (10, 10), "b": (7,)}, density=0.25, scope="per_tensor", seed=0)
    assert r.counts == {"a": 25, "b": 2}
    g = random_mask({"a": (10, 10), "b": (7,)}, density=0.25, scope="global", seed=0)
    assert g.changed == round(0.25 * 107)
    with pytest.raises(UsageError, match="scope"):
        random_mask({"a": (4,)}, density=0.5, scope="layer")
    with pytest.raises(UsageError, match="density"):
        random_mask({"a": (4,)}, density=1.5)
    with pytest.raises(UsageError, match="density="):
        random_mask({"a": (4,)})


def test_positions_are_uniform():
    """Each position's inclusion frequency over many draws is k/n (binomial tolerance, 5 sigma)."""
    n, k, draws = 40, 10, 2000
    hits = np.zeros(n)
    for seed in range(draws):
        hits += random_mask({"w": (n,)}, density=k / n, seed=seed).numpy("w")
    p = k / n
    sigma = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(hits - draws * p) < 5 * sigma)


def test_split_count_is_exact_at_any_scale():
    rng = np.random.default_rng(0)
    sizes = [3_000_000_000, 2_000_000_000, 5, 0, 7 * CHUNK]
    for k in (0, 1, 12_345, 1_000_000_007, sum(sizes)):
        counts = split_count(sizes, k, rng)
        assert sum(counts) == k
        assert all(0 <= c <= s for c, s in zip(counts, sizes))
    with pytest.raises(UsageError):
        split_count([3], 4, rng)


def test_chunked_tensors_keep_exact_counts():
    """A tensor larger than one sampling chunk: exact count, bits spread over every chunk."""
    numel = 2 * CHUNK + 24
    r = random_mask({"big": (numel,)}, density=0.001, seed=0)
    assert r.changed == round(0.001 * numel)
    flags = r.numpy("big")
    assert flags[:CHUNK].any() and flags[CHUNK : 2 * CHUNK].any()


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_seed_must_be_a_non_negative_integer(seed):
    from rlsubnet.errors import UsageError

    with pytest.raises(UsageError, match="seed must be a non-negative integer"):
        random_mask({"w": (4, 4)}, density=0.5, seed=seed)
