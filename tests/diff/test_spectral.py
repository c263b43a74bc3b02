"""Spectral metrics on constructed matrices whose answers are known in closed form."""

import json
import math
import warnings

import pytest
import torch

from rlsubnet.diff.spectral import (
    METRICS,
    SpectralStats,
    _largest_angle_deg,
    aggregate,
    check_top_k,
    spectral_stats,
)
from rlsubnet._threads import single_threaded_torch
from rlsubnet.diff.stats import update_rank
from rlsubnet.errors import MismatchError, UsageError

M, N = 60, 40


@pytest.fixture(autouse=True)
def one_thread():
    # SVDs this small gain nothing from threads, and OpenMP threads spinning against other processes on a busy
    # two-core machine made this file ten times slower
    with single_threaded_torch():
        yield


def bases(m=M, n=N, seed=0):
    """Random orthogonal U (m×m) and V (n×n), float64."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return u, v


def synth(u, v, sigma):
    """U[:, :r] diag(σ) V[:, :r]ᵀ."""
    r = len(sigma)
    return u[:, :r] @ torch.diag(torch.as_tensor(sigma, dtype=torch.float64)) @ v[:, :r].T


def base_matrix(u, v):
    """W0 with distinct, well-separated singular values 40, 39, ..., 1."""
    return synth(u, v, torch.arange(N, 0, -1, dtype=torch.float64))


def test_exact_rank_r_with_equal_singular_values():
    u, v = bases()
    w0 = base_matrix(u, v)
    r = 10
    # Δ's singular vectors are unrelated to W0's: a fresh pair of bases
    du, dv = bases(seed=1)
    delta = synth(du, dv, [0.5] * r)
    s = spectral_stats(w0, w0 + delta, delta, top_k=4)
    assert s.numerical_rank == r == update_rank(delta)[0]
    assert s.stable_rank == pytest.approx(r, rel=1e-5)
    assert s.effective_rank == pytest.approx(r, rel=1e-5)
    assert s.energy_rank_90 == 9  # 9 of 10 equal directions hold exactly 90%
    assert s.energy_rank_99 == 10
    assert s.method == s.subspace_method == s.delta_method == "exact"


def test_energy_stable_and_effective_rank_of_a_known_spectrum():
    u, v = bases()
    w0 = base_matrix(u, v)
    sq = torch.tensor([50.0, 30.0, 12.0, 5.0, 2.5, 0.5], dtype=torch.float64)  # σ², summing to 100
    sigma = sq.sqrt()
    du, dv = bases(seed=2)
    delta = synth(du, dv, sigma)
    s = spectral_stats(w0, w0 + delta, delta, top_k=3)
    assert s.energy_rank_90 == 3  # 50 + 30 + 12 = 92
    assert s.energy_rank_99 == 5  # 97.5 + 2.5 = 99.5 (four hold 97)
    assert s.stable_rank == pytest.approx(100 / 50, rel=1e-5)
    p = sigma / sigma.sum()
    assert s.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert s.numerical_rank == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numerical_rank_is_update_rank_on_bf16_updates(seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(80, 50, generator=g).bfloat16()
    low = (torch.randn(80, 7, generator=g) @ torch.randn(7, 50, generator=g)) * 1e-2
    w1 = (w0.float() + low).bfloat16()
    delta = (w1 - w0).float()
    s = spectral_stats(w0, w1, delta, top_k=5)
    assert s.numerical_rank == update_rank(delta)[0]


def test_principal_energy_inside_orthogonal_and_one_sided():
    u, v = bases()
    w0 = base_matrix(u, v)
    k = 5
    g = torch.Generator().manual_seed(3)
    inside = u[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64) @ v[:, :k].T
    outside = u[:, k:N] @ torch.randn(N - k, N - k, generator=g, dtype=torch.float64) @ v[:, k:].T
    left_only = u[:, :k] @ torch.randn(k, N - k, generator=g, dtype=torch.float64) @ v[:, k:].T
    s = spectral_stats(w0, w0 + inside, inside, top_k=k)
    assert (s.principal_energy, s.principal_energy_left, s.principal_energy_right) == pytest.approx((1, 1, 1), abs=1e-6)
    s = spectral_stats(w0, w0 + outside, outside, top_k=k)
    assert (s.principal_energy, s.principal_energy_left, s.principal_energy_right) == pytest.approx((0, 0, 0), abs=1e-6)
    s = spectral_stats(w0, w0 + left_only, left_only, top_k=k)
    assert (s.principal_energy, s.principal_energy_left, s.principal_energy_right) == pytest.approx((0, 1, 0), abs=1e-6)
    assert s.principal_energy_chance == k * k / (M * N)
    assert s.principal_energy_left_chance == k / M
    assert s.principal_energy_right_chance == k / N


def test_principal_energy_of_random_updates_sits_at_chance():
    u, v = bases()
    w0 = base_matrix(u, v)
    k = 4
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(M, N, generator=g, dtype=torch.float64) for _ in range(20)]
    runs = [spectral_stats(w0, w0 + d, d, top_k=k) for d in deltas]
    keys = ("principal_energy", "principal_energy_left", "principal_energy_right")
    mean = {key: sum(getattr(s, key) for s in runs) / len(runs) for key in keys}
    # 20 draws of 16 (k²), 160 (k·n) and 240 (k·m) squared Gaussians: relative sd 8%, 2.5%, 2%
    assert mean["principal_energy"] == pytest.approx(k * k / (M * N), rel=0.3)
    assert mean["principal_energy_left"] == pytest.approx(k / M, rel=0.1)
    assert mean["principal_energy_right"] == pytest.approx(k / N, rel=0.1)


def rotate(basis, i, j, theta):
    """Basis with column i turned toward column j by theta (radians) within their plane."""
    out = basis.clone()
    c, s = math.cos(theta), math.sin(theta)
    out[:, i] = c * basis[:, i] + s * basis[:, j]
    out[:, j] = -s * basis[:, i] + c * basis[:, j]
    return out


@pytest.mark.parametrize("degrees", [1e-3, 3.0, 60.0, 90.0])
@pytest.mark.parametrize("side", ["left", "right"])
def test_rotating_a_top_singular_vector_out_of_the_top_k(degrees, side):
    u, v = bases()
    w0 = base_matrix(u, v)
    k = 5
    sigma = torch.arange(N, 0, -1, dtype=torch.float64)
    theta = math.radians(degrees)
    # the first singular vector turned toward the (k+1)-th: the top-k subspace turns by theta in that plane,
    # the other side and the singular values stay put
    w1 = synth(rotate(u, 0, k, theta), v, sigma) if side == "left" else synth(u, rotate(v, 0, k, theta), sigma)
    s = spectral_stats(w0, w1, top_k=k)
    turned, fixed = (s.principal_angle_left, s.principal_angle_right)[:: 1 if side == "left" else -1]
    assert turned == pytest.approx(degrees, rel=1e-6, abs=1e-9)
    assert fixed == pytest.approx(0.0, abs=1e-6)
    assert s.spectral_drift == pytest.approx(0.0, abs=1e-12)


def test_tiny_angles_are_resolved_where_arccos_would_round_to_zero():
    u, _ = bases()
    theta = math.radians(1e-7)  # cos θ = 1 − 1.5e-18 rounds to 1 in float64
    assert _largest_angle_deg(u[:, :4], rotate(u, 0, 4, theta)[:, :4]) == pytest.approx(1e-7, rel=1e-6)
    assert _largest_angle_deg(u[:, :4], rotate(u, 0, 4, math.radians(70))[:, :4]) == pytest.approx(70, rel=1e-9)


def test_drift_counts_the_top_k_singular_values_only():
    u, v = bases()
    sigma = torch.arange(N, 0, -1, dtype=torch.float64)
    w0 = synth(u, v, sigma)
    k = 4
    up = sigma.clone()
    up[0] += 2.0  # the largest grows by 2
    s = spectral_stats(w0, synth(u, v, up), top_k=k)
    assert s.spectral_drift == pytest.approx(2.0 / float(sigma[:k].norm()), rel=1e-9)
    # values are compared in sorted order: the second growing past the first moves both by one
    up = sigma.clone()
    up[1] += 2.0
    s = spectral_stats(w0, synth(u, v, up), top_k=k)
    assert s.spectral_drift == pytest.approx(math.sqrt(2.0) / float(sigma[:k].norm()), rel=1e-9)
    below = sigma.clone()
    below[k + 2] *= 0.5  # outside the top k
    assert spectral_stats(w0, synth(u, v, below), top_k=k).spectral_drift == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [0.05, -0.3, 1e-4])
def test_scaled_base_drifts_by_the_scale_and_does_not_turn(scale):
    u, v = bases()
    w0 = base_matrix(u, v)
    s = spectral_stats(w0, (1 + scale) * w0, top_k=6)
    assert s.spectral_drift == pytest.approx(abs(scale), rel=1e-9)
    assert s.principal_angle_left == pytest.approx(0.0, abs=1e-5)
    assert s.principal_angle_right == pytest.approx(0.0, abs=1e-5)
    # Δ = s·W0 has W0's spectrum: all of its energy in W0's top-k is the top-k share of W0's
    sigma = torch.arange(N, 0, -1, dtype=torch.float64)
    assert s.principal_energy == pytest.approx(float((sigma[:6] ** 2).sum() / (sigma**2).sum()), rel=1e-6)
    assert s.numerical_rank == N


def test_zero_update_has_zero_ranks_and_undefined_shares_without_warnings():
    u, v = bases()
    w0 = base_matrix(u, v).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = spectral_stats(w0, w0.clone(), top_k=3)
    assert (s.numerical_rank, s.energy_rank_90, s.energy_rank_99) == (0, 0, 0)
    assert (s.stable_rank, s.effective_rank) == (0.0, 0.0)
    assert s.principal_energy is s.principal_energy_left is s.principal_energy_right is None
    assert s.principal_energy_chance == 9 / (M * N)
    assert s.spectral_drift == 0.0
    assert s.principal_angle_left == pytest.approx(0.0, abs=1e-6)


def test_zero_base_and_rank_deficient_base_leave_drift_or_angles_undefined():
    u, v = bases()
    zero = torch.zeros(M, N)
    s = spectral_stats(zero, zero, top_k=2)
    assert s.spectral_drift is None and s.principal_angle_left is None and s.principal_angle_right is None
    low = synth(u, v, [3.0, 2.0, 1.0])  # rank 3: no top-5 subspace
    s = spectral_stats(low, 1.1 * low, top_k=5)
    assert s.principal_angle_left is None and s.principal_angle_right is None
    assert s.spectral_drift == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("where", ["w0", "w1", "delta"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrices_are_flagged_with_no_metrics(where, bad):
    u, v = bases()
    w = {"w0": base_matrix(u, v).float()}
    w["w1"] = w["w0"] * 1.01
    w["delta"] = w["w1"] - w["w0"]
    w[where][3, 4] = bad
    s = spectral_stats(w["w0"], w["w1"], w["delta"], top_k=3, name="model.layers.0.mlp.up_proj.weight")
    assert s.nonfinite
    rec = s.to_record()
    assert rec["nonfinite"] is True
    assert all(rec[key] is None for key in METRICS if not key.endswith("_chance"))
    json.dumps(rec, allow_nan=False)


@pytest.mark.parametrize("top_k", [0, -1, N + 1, 2.5, True, "3"])
def test_bad_top_k_is_a_usage_error_naming_the_option(top_k):
    u, v = bases()
    w0 = base_matrix(u, v)
    with pytest.raises(UsageError, match="--top-k"):
        spectral_stats(w0, w0, top_k=top_k, name="model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(UsageError, match="--top-k"):
        check_top_k(top_k, (M, N))
    check_top_k(N, (M, N))  # the full rank is allowed


def test_mismatched_shapes_are_rejected_naming_the_matrix():
    with pytest.raises(MismatchError, match="q_proj"):
        spectral_stats(torch.zeros(4, 3), torch.zeros(3, 4), top_k=1, name="model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(MismatchError):
        spectral_stats(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 4), top_k=1)
    with pytest.raises(MismatchError):
        spectral_stats(torch.zeros(4), torch.zeros(4), top_k=1)


def realistic_pair(m=600, n=400, seed=0):
    """W0: rank-30 signal with decaying singular values plus noise; W1: 30% of entries moved by ~1e-3 of them."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(m, 30, generator=g)).Q
    b = torch.linalg.qr(torch.randn(n, 30, generator=g)).Q
    w0 = (a * (10 * torch.arange(1, 31) ** -0.7)) @ b.T + 0.05 * torch.randn(m, n, generator=g)
    moved = torch.rand(m, n, generator=g) < 0.3
    w1 = w0 + moved * w0 * 1e-3 * torch.randn(m, n, generator=g)
    return w0, w1


def test_randomized_subspaces_agree_with_exact_within_the_stated_error():
    # measured over seeds 0-3: energies within 1e-7, angles within 6e-6° (of ~0.02°), drift within 1.4e-7
    # relative; with 2 power iterations instead of 16 the angles are off by up to 0.03° and the drift by 34%
    w0, w1 = realistic_pair()
    exact = spectral_stats(w0, w1, top_k=8)
    rand = spectral_stats(w0, w1, top_k=8, exact_max_elements=0)
    assert exact.method == "exact" and rand.method == rand.subspace_method == "randomized"
    assert rand.delta_method == "exact"
    assert exact.principal_angle_left > 0.01  # a real rotation to measure
    for key in ("principal_energy", "principal_energy_left", "principal_energy_right"):
        assert getattr(rand, key) == pytest.approx(getattr(exact, key), abs=1e-6), key
    for key in ("principal_angle_left", "principal_angle_right"):
        assert getattr(rand, key) == pytest.approx(getattr(exact, key), abs=1e-4), key
    assert rand.spectral_drift == pytest.approx(exact.spectral_drift, rel=1e-5)
    for key in ("numerical_rank", "stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99"):
        assert getattr(rand, key) == getattr(exact, key), key  # Δ's spectrum is exact in both


def test_randomized_delta_spectrum_finds_low_energy_ranks_and_leaves_the_rest_undefined():
    w0, _ = realistic_pair()
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(600, 20, generator=g)).Q
    v = torch.linalg.qr(torch.randn(400, 20, generator=g)).Q
    low = (u * torch.linspace(2, 1, 20)) @ v.T + 1e-4 * torch.randn(600, 400, generator=g)
    exact = spectral_stats(w0, w0 + low, low, top_k=4)
    rand = spectral_stats(w0, w0 + low, low, top_k=4, delta_exact_max_elements=0)
    assert rand.delta_method == rand.method == "randomized" and rand.subspace_method == "exact"
    assert (rand.energy_rank_90, rand.energy_rank_99) == (exact.energy_rank_90, exact.energy_rank_99)
    assert rand.stable_rank == pytest.approx(exact.stable_rank, rel=1e-4)
    assert rand.numerical_rank is None and rand.effective_rank is None
    # a flat spectrum: 99% of its energy needs more than the 16 directions allowed
    flat = 1e-3 * torch.randn(600, 400, generator=g)
    rand = spectral_stats(w0, w0 + flat, flat, top_k=4, delta_exact_max_elements=0, delta_max_q=16)
    assert rand.energy_rank_90 is None and rand.energy_rank_99 is None


def test_randomized_runs_are_repeatable_and_leave_the_global_generator_alone():
    w0, w1 = realistic_pair(seed=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = spectral_stats(w0, w1, top_k=8, exact_max_elements=0, delta_exact_max_elements=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = spectral_stats(w0, w1, top_k=8, exact_max_elements=0, delta_exact_max_elements=0)
    assert a.to_record() == b.to_record()


def test_bf16_inputs_and_record_keys():
    w0, w1 = realistic_pair(seed=2)
    w0, w1 = w0.bfloat16(), w1.bfloat16()
    s = spectral_stats(w0, w1, (w1 - w0).float(), top_k=8, name="model.layers.7.self_attn.o_proj.weight")
    rec = s.to_record()
    assert list(rec) == [
        "name", "layer", "module", "shape", "top_k", "method", "subspace_method", "delta_method", "nonfinite",
        "numerical_rank", "stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99",
        "principal_energy", "principal_energy_chance", "principal_energy_left", "principal_energy_left_chance",
        "principal_energy_right", "principal_energy_right_chance", "principal_angle_left", "principal_angle_right",
        "spectral_drift", "top_k_gap",
    ]  # fmt: skip
    assert (rec["layer"], rec["module"], rec["shape"], rec["top_k"]) == (7, "o", [600, 400], 8)
    assert all(rec[key] is not None for key in METRICS)
    assert all(type(rec[key]) in (int, float) for key in METRICS)
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    assert 0 < rec["top_k_gap"] < 1


def test_aggregate_takes_unweighted_means_per_layer_and_module():
    def rec(name, **metrics):
        s = SpectralStats(name=name, shape=(4, 4), top_k=1)
        for key, value in metrics.items():
            setattr(s, key, value)
        return s.to_record()

    records = [
        rec("model.layers.0.self_attn.q_proj.weight", stable_rank=2.0, principal_angle_left=1.0),
        rec("model.layers.0.mlp.up_proj.weight", stable_rank=4.0, principal_angle_left=None),
        rec("model.layers.1.self_attn.q_proj.weight", stable_rank=6.0, principal_angle_left=3.0),
        rec("model.layers.1.mlp.up_proj.weight", nonfinite=True),
        rec("model.embed_tokens.weight", stable_rank=10.0),
    ]
    out = aggregate(records)
    layers = {row["layer"]: row for row in out["layers"]}
    assert sorted(layers) == [0, 1]
    assert layers[0]["matrices"] == 2 and layers[0]["nonfinite"] == 0
    assert layers[0]["stable_rank"] == 3.0
    assert layers[0]["principal_angle_left"] == 1.0  # the undefined one is left out of the mean
    assert layers[1]["matrices"] == 1 and layers[1]["nonfinite"] == 1 and layers[1]["stable_rank"] == 6.0
    modules = {row["module"]: row for row in out["modules"]}
    assert [row["module"] for row in out["modules"]] == ["q", "up", "embed"]
    assert modules["q"]["stable_rank"] == 4.0 and modules["q"]["principal_angle_left"] == 2.0
    assert modules["up"]["stable_rank"] == 4.0 and modules["up"]["nonfinite"] == 1
    assert modules["embed"]["stable_rank"] == 10.0 and modules["embed"]["spectral_drift"] is None
    # records without layer/module keys are grouped by their names
    bare = [{k: v for k, v in r.items() if k not in ("layer", "module")} for r in records]
    assert aggregate(bare) == out
