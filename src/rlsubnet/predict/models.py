"""The drift models behind the predictors: how far an fp32 master can move in the run, as a distribution.

Adam normalises each entry's step by the root mean square of its gradient, so an update is at most about lr in
magnitude. Write the per-entry gradient as a mean μ plus noise σ; with c = μ / √(μ² + σ²) ∈ [−1, 1] (the
*steadiness*: 1 when every step pushes the same way, 0 for pure noise), the sum of Adam's unit steps over a
schedule with Σ lr_t = L1 and √Σ lr_t² = L2 is about normal with mean c·L1 (the steady part) and variance
(1 − c²)·L2² (the random walk). An entry's stored value changes when its drift X passes the rounding boundary
above it (distance ``up``) or below it (``down``): P(changed) = P(X > up) + P(X < −down).

- *budget*: c is unknown, so it is averaged over a uniform prior on [−1, 1], the least committal one on its
  range. Decoupled weight decay (AdamW) adds a known drift w·(Π(1 − lr_t·wd) − 1) toward 0, which shifts the
  two distances. SGD's step is lr·g, which no bound on lr alone limits: it needs a probe.
- *probe*: the gradients of K probe steps estimate each entry's steadiness ĉ; the drift after K steps is known;
  the rest of the schedule, steps K..T−1 with reaches L1' and L2', adds a drift whose mean and variance average
  the model above over the posterior of c given ĉ (:class:`SteadinessPosterior`), taken as normal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

_NODES = 256  # Gauss–Legendre nodes over c
_GRID = 2048  # points of the tail table
_MOMENT_GRID = 4097  # points of the posterior-moment table, uniform in atanh(ĉ) over ±_MOMENT_SPAN
_MOMENT_SPAN = 7.0


@functools.lru_cache(maxsize=8)
def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [−1, 1] (computed once: an eigenvalue problem of size n)."""
    c, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(c), torch.from_numpy(w)


def normal_above(mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P(X > x) for X ~ N(mean, std²), elementwise (std 0: the point mass at mean)."""
    pos = std > 0
    z = (mean - x) / torch.where(pos, std, torch.ones_like(std))
    return torch.where(pos, torch.special.ndtr(z), (mean > x).to(mean.dtype))


def normal_changed(mean: torch.Tensor, std: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """P(X > up) + P(X < −down) for X ~ N(mean, std²), elementwise."""
    return (normal_above(mean, std, up) + normal_above(-mean, std, down)).clamp(0.0, 1.0)


class UniformSteadinessTail:
    """T(x) = P(X > x) where X | c ~ N(c·L1, (1 − c²)·L2²) and c ~ U[−1, 1]; tabulated once, then interpolated.

    T(0) = 1/2 and T(−x) = 1 − T(x) by symmetry, so P(changed) = T(up) + T(down) holds for shifted distances
    of either sign."""

    def __init__(self, l1: float, l2: float):
        self.l1, self.l2 = float(l1), float(l2)
        nodes, weights = gauss_legendre(_NODES)
        c = nodes[:, None]
        w = weights[:, None] / 2  # the uniform density on [−1, 1] is 1/2
        top = self.l1 + 12.0 * self.l2 if self.l2 > 0 else self.l1
        lo = max(top * 1e-9, 1e-300)
        x = torch.from_numpy(np.geomspace(lo, max(top, lo * 10), _GRID))[None, :]
        mean = c * self.l1
        std = torch.sqrt((1 - c * c).clamp_min(0)) * self.l2
        p = normal_above(mean, std, x)  # [nodes, grid]
        self.logx = torch.log(x[0])
        self.values = (w * p).sum(0).clamp(0.0, 0.5)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs().clamp_min(1e-300)
        la = torch.log(a)
        idx = torch.searchsorted(self.logx, la).clamp(1, len(self.logx) - 1)
        x0, x1 = self.logx[idx - 1], self.logx[idx]
        v0, v1 = self.values[idx - 1], self.values[idx]
        t = ((la - x0) / (x1 - x0)).clamp(0.0, 1.0)
        v = v0 + (v1 - v0) * t
        v = torch.where(la < self.logx[0], torch.full_like(v, 0.5), v)
        v = torch.where(la > self.logx[-1], torch.zeros_like(v), v)
        v = torch.where(x == 0, torch.full_like(v, 0.5), v)
        return torch.where(x < 0, 1.0 - v, v)


def budget_changed(
    tail: Callable[[torch.Tensor], torch.Tensor], up: torch.Tensor, down: torch.Tensor, decay_drift: torch.Tensor
) -> torch.Tensor:
    """P(changed) of the budget predictor: ``decay_drift`` (signed, known) shifts the boundaries."""
    return (tail(up - decay_drift) + tail(down + decay_drift)).clamp(0.0, 1.0)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def safe_log2(x: torch.Tensor, lo: float = -40.0, hi: float = 40.0) -> torch.Tensor:
    return torch.log2(x.abs().clamp_min(2.0**lo)).clamp(lo, hi)


def finite_or(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, value))


def check_probability(p: float, what: str) -> float:
    from rlsubnet.errors import UsageError

    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p <= 1):
        raise UsageError(f"{what} must be a probability in [0, 1], got {p!r}")
    return float(p)


def spread(c: torch.Tensor, k: int) -> torch.Tensor:
    """Variance of the probe's estimate ĉ given c after k steps (floored: finite likelihood at |c| = 1)."""
    return (1 - c**2).clamp_min(0) ** 3 / k + 1e-4 / k


def fit_prior_beta(c_hat: torch.Tensor, k: int, lo: float = 0.25, hi: float = 64.0) -> float:
    """β of the symmetric prior p(c) ∝ (1 − c²)^(β−1) on [−1, 1] (β = 1: uniform) whose second moment,
    1 / (2β + 1), matches the tensor's mean ĉ² once the estimate's own spread is taken out (empirical Bayes:
    a tensor whose entries mostly wander gets a prior near 0, one that mostly drifts a prior near ±1)."""
    if c_hat.numel() == 0:
        return 1.0
    c, w = gauss_legendre(64)
    seen = float((c_hat.to(torch.float64) ** 2).mean())
    beta = 1.0
    for _ in range(50):
        dens = w * (1 - c**2).clamp_min(1e-300) ** (beta - 1)
        dens = dens / dens.sum()
        noise = float((dens * spread(c, k)).sum())
        m2 = min(max(seen - noise, 1.0 / (2 * hi + 1)), 1.0 / (2 * lo + 1))
        new = (1.0 / m2 - 1.0) / 2
        if abs(new - beta) < 1e-6 * beta:
            break
        beta = new
    return float(min(max(beta, lo), hi))


class SteadinessPosterior:
    """The probe predictor's belief about an entry's steadiness c: a prior (:func:`fit_prior_beta`, per tensor)
    updated by the probe's estimate ĉ = μ̂ / rms, whose spread after K steps is about (1 − c²)^{3/2} / √K (the
    delta method on μ̂ / √(μ̂² + σ²)). Given c, the rest of the run drifts by N(−c·s·L1', (1 − c²)·s²·L2'²), s the
    unit step's scale; over the posterior of c that drift has mean −E[c]·s·L1' and variance
    Var[c]·(s·L1')² + (1 − E[c²])·(s·L2')², and P(changed) is that of the normal with those two moments.

    The posterior moments depend on ĉ alone (for one tensor's prior and K), so they are computed once on a grid
    and interpolated linearly: the grid is uniform in atanh(ĉ) over [−7, 7], dense toward |ĉ| = 1 where the
    posterior narrows fastest; within about 1e-5 of the quadrature (Gauss–Legendre nodes over c) for K ≥ 2, at a
    cost per entry that does not grow with the number of nodes."""

    def __init__(self, k: int, prior_beta: float = 1.0, nodes: int = 64, grid: int = _MOMENT_GRID):
        self.c, w = gauss_legendre(nodes)
        self.logw = torch.log(w) + (prior_beta - 1.0) * torch.log1p(-(self.c**2))
        self.k, self.prior_beta = k, prior_beta
        self.var = spread(self.c, k)
        u = torch.linspace(-_MOMENT_SPAN, _MOMENT_SPAN, grid, dtype=torch.float64)
        weights = self._weights(torch.tanh(u))
        self.table = torch.stack([weights @ self.c, weights @ self.c**2])  # [2, grid]: E[c | ĉ], E[c² | ĉ]

    def _weights(self, c_hat: torch.Tensor) -> torch.Tensor:
        ll = -0.5 * (c_hat[:, None] - self.c[None, :]) ** 2 / self.var - 0.5 * torch.log(self.var) + self.logw
        return torch.softmax(ll, dim=1)

    def moments(self, c_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[c | ĉ], E[c² | ĉ]) elementwise, float64."""
        g = self.table.shape[1]
        edge = math.tanh(_MOMENT_SPAN)
        u = torch.atanh(c_hat.to(torch.float64).clamp(-edge, edge))
        x = (u + _MOMENT_SPAN) * ((g - 1) / (2 * _MOMENT_SPAN))
        i = x.floor().clamp(0, g - 2)
        f = x - i
        i = i.to(torch.int64)
        lo, hi = self.table[:, i], self.table[:, i + 1]
        m = lo + (hi - lo) * f
        return m[0], m[1]

    def posterior_mean(self, c_hat: torch.Tensor) -> torch.Tensor:
        return self.moments(c_hat)[0]

    def drift(
        self, c_hat: torch.Tensor, base_mean: torch.Tensor, steady: torch.Tensor, walk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the total drift: the drift so far plus known drifts ``base_mean``, and
        per unit of c a steady reach ``steady`` (s·L1') and a random-walk reach ``walk`` (s·L2')."""
        ec, ec2 = self.moments(c_hat)
        var = (ec2 - ec * ec).clamp_min(0.0) * steady * steady + (1.0 - ec2).clamp_min(0.0) * walk * walk
        return base_mean - ec * steady, var.sqrt()

    def changed(
        self,
        c_hat: torch.Tensor,
        base_mean: torch.Tensor,
        steady: torch.Tensor,
        walk: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
    ) -> torch.Tensor:
        """P(changed) of the normal drift :meth:`drift` against the distances ``up`` and ``down``."""
        mean, std = self.drift(c_hat, base_mean, steady, walk)
        return normal_changed(mean, std, up, down)
