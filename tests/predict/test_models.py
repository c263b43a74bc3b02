"""The probe predictor's drift model, the calibration's fit, and the chunking: each against a direct computation."""

from __future__ import annotations

import pytest
import torch
from predict_toy import grad_fn_for, make_toy, realized_mask, state, train

import rlsubnet
from rlsubnet.predict import Plan, fit_calibration, run_probe
from rlsubnet.predict import core as predict_core
from rlsubnet.predict.calibrate import _logistic
from rlsubnet.predict.models import SteadinessPosterior, normal_changed

PLAN = Plan(steps=30, lr=1e-6)


@pytest.mark.parametrize("k, beta", [(2, 1.0), (10, 0.4), (10, 3.0), (50, 20.0)])
def test_tabulated_posterior_moments_match_the_quadrature(k, beta):
    post = SteadinessPosterior(k, prior_beta=beta)
    g = torch.Generator().manual_seed(k)
    c_hat = torch.cat(
        [
            torch.linspace(-1, 1, 1001, dtype=torch.float64),
            torch.rand(2000, generator=g, dtype=torch.float64) * 2 - 1,
            1 - torch.rand(200, generator=g, dtype=torch.float64) * 1e-3,  # the edge, where the posterior narrows
        ]
    )
    w = post._weights(c_hat)  # the exact posterior over the Gauss–Legendre nodes
    ec, ec2 = post.moments(c_hat)
    tol = 5e-5 if k == 2 else 1e-5
    assert torch.allclose(ec, w @ post.c, atol=tol, rtol=0)
    assert torch.allclose(ec2, w @ post.c**2, atol=tol, rtol=0)
    # the posterior pulls ĉ toward the prior: never past it, and more so after fewer steps
    assert bool((ec.abs() <= c_hat.abs() + 1e-12).all())


def test_drift_is_the_posterior_average_of_the_conditional_normal():
    post = SteadinessPosterior(10, prior_beta=1.5)
    c_hat = torch.tensor([-0.9, -0.3, 0.0, 0.2, 0.7], dtype=torch.float64)
    base = torch.tensor([1e-6, 0.0, -2e-6, 3e-6, 0.0], dtype=torch.float64)
    steady, walk = torch.full_like(c_hat, 9e-5), torch.full_like(c_hat, 9.5e-6)
    mean, std = post.drift(c_hat, base, steady, walk)
    w = post._weights(c_hat)
    # mixture moments: E[X] = base − E[c]·steady; Var[X] = E[Var(X|c)] + Var(E[X|c])
    m_c = base[:, None] - post.c[None, :] * steady[:, None]
    v_c = (1 - post.c[None, :] ** 2) * walk[:, None] ** 2
    exact_mean = (w * m_c).sum(1)
    exact_var = (w * (v_c + m_c**2)).sum(1) - exact_mean**2
    assert torch.allclose(mean, exact_mean, rtol=1e-4, atol=1e-11)
    assert torch.allclose(std**2, exact_var, rtol=1e-3, atol=1e-18)
    up, down = torch.full_like(c_hat, 4e-5), torch.full_like(c_hat, 6e-5)
    assert torch.equal(post.changed(c_hat, base, steady, walk, up, down), normal_changed(mean, std, up, down))


def test_newton_fit_reaches_the_regularised_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 5, generator=g, dtype=torch.float64)
    truth = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(x @ truth - 0.7)).to(torch.float64)
    l2 = 1e-3
    w, b, loss = _logistic(x, y, l2)
    theta = torch.cat([w.double(), torch.tensor([b], dtype=torch.float64)]).requires_grad_(True)
    z = x @ theta[:-1] + theta[-1]
    objective = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + l2 * (theta[:-1] ** 2).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    assert float(grad.abs().max()) < 1e-6  # stationary: the convex objective's minimum (up to float32 weights)
    assert abs(loss - float(torch.nn.functional.binary_cross_entropy_with_logits(z.detach(), y))) < 1e-6
    w, b, _ = _logistic(x, y, 1e-7)  # all but unregularised: the weights the labels were drawn from
    assert torch.allclose(w.double(), truth, atol=0.15) and abs(b + 0.7) < 0.1


@pytest.fixture(scope="module")
def two_runs():
    def run(seed):
        model = make_toy()
        base = state(model)
        grad_fn = grad_fn_for(noise=1.0, teacher_seed=seed)
        probe = run_probe(model, grad_fn, PLAN, 3, run_id=f"run-{seed}")
        train(model, PLAN, grad_fn)
        return base, probe, realized_mask(base, model)

    return run(1), run(2)


def test_blocks_cover_every_entry_once_in_order(two_runs, monkeypatch):
    (base, _, _), _ = two_runs
    monkeypatch.setattr(predict_core, "CHUNK", 100)
    ck = predict_core.open_base(base, PLAN, None)
    try:
        blocks = list(predict_core._blocks(ck))
        pieces = [p for b in blocks for p in b]
        assert all(sum(stop - start for _, start, stop in b) <= 100 for b in blocks)
        assert any(len(b) > 1 for b in blocks)  # small tensors share a block
        for name in ck.names():
            mine = [(start, stop) for n, start, stop in pieces if n == name]
            assert mine[0][0] == 0 and mine[-1][1] == ck.info(name).numel
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))  # contiguous, no overlap
    finally:
        ck.close()


def test_predictions_and_fits_do_not_depend_on_the_chunking(two_runs, monkeypatch):
    (base, probe_a, real_a), (_, probe_b, _) = two_runs
    whole = {
        "budget": rlsubnet.predict(base, PLAN).probabilities,
        "probe": rlsubnet.predict(base, PLAN, probe_b).probabilities,
    }
    cal = fit_calibration(base, PLAN, real_a, probe_a)
    monkeypatch.setattr(predict_core, "CHUNK", 40)  # a multiple of 8, as mask blocks need
    assert fit_calibration(base, PLAN, real_a, probe_a).weights == cal.weights  # the sample is drawn model-wide
    for name, probe in (("budget", None), ("probe", probe_b)):
        cut = rlsubnet.predict(base, PLAN, probe).probabilities
        assert all(torch.equal(whole[name][n], cut[n]) for n in cut), name


def test_calibration_fit_is_deterministic_and_seeded(two_runs):
    (base, probe_a, real_a), _ = two_runs
    one = fit_calibration(base, PLAN, real_a, probe_a, max_entries=500)
    two = fit_calibration(base, PLAN, real_a, probe_a, max_entries=500)
    other = fit_calibration(base, PLAN, real_a, probe_a, max_entries=500, seed=1)
    assert one.weights == two.weights and one.bias == two.bias
    assert one.weights != other.weights
    assert one.fit["entries"] <= 500 and one.fit["seed"] == 0
