"""Where an update points: spectral metrics of one update matrix against its base. Pure functions over tensors.

For a 2-D base matrix W0 (m×n), its tuned version W1 and Δ = W1 − W0 in the comparison dtype:

- ``numerical_rank``: singular values of Δ above torch.linalg.matrix_rank's default tolerance
  τ = σ_1(Δ)·max(m, n)·ε_fp32 (the same number as :func:`rlsubnet.diff.stats.update_rank`);
- ``stable_rank`` = ‖Δ‖_F² / ‖Δ‖_2²;
- ``effective_rank`` (Roy & Vetterli 2007) = exp(−Σ p_i ln p_i), p_i = σ_i / Σ_j σ_j, over the singular values
  above τ (those below it are rounding noise, and a few hundred of them would lift an exact rank r above r);
- ``energy_rank_90`` / ``energy_rank_99``: the fewest j with Σ_{i≤j} σ_i² ≥ f·‖Δ‖_F² (f = 0.9, 0.99; compared
  to a relative 1e-6 so that r equal singular values holding exactly 90% count);
- ``principal_energy`` = ‖U_kᵀ Δ V_k‖_F² / ‖Δ‖_F², U_k and V_k the top-k left and right singular vectors of W0;
  a Δ of i.i.d. entries gives k²/(m·n) in expectation (``principal_energy_chance``). One-sided:
  ``principal_energy_left`` = ‖U_kᵀ Δ‖_F² / ‖Δ‖_F² (chance k/m), ``principal_energy_right`` = ‖Δ V_k‖_F² /
  ‖Δ‖_F² (chance k/n);
- ``principal_angle_left`` / ``_right``: the largest principal angle, in degrees, between the top-k left (right)
  singular subspaces of W0 and W1. With A, B orthonormal bases, cos θ_i are the singular values of AᵀB; the
  largest angle is taken from arccos of the smallest one when it is ≥ 45° and from arcsin(‖B − A·AᵀB‖_2)
  below (Knyazev & Argentati 2002: a cosine near 1 has lost half its digits, so arccos resolves no angle under
  ~1e-6° even in float64; arcsin does);
- ``spectral_drift`` = ‖σ_{1..k}(W1) − σ_{1..k}(W0)‖_2 / ‖σ_{1..k}(W0)‖_2, both in descending order.

Undefined values are None, never a division error: Δ = 0 has every rank 0 and no principal energy; the angles
need σ_k > τ_W in both W0 and W1 (a top-k subspace exists); the drift needs W0 ≠ 0. A matrix with a non-finite
value gets ``nonfinite=True`` and no metrics: the caller counts and skips it.

Precision. Singular values of W0 and W1 are differenced in the drift, and under an RL update of bf16-ULP size
the drift is ~1e-5 relative, near float32's rounding of separately computed SVDs (ε_fp32·σ_1). So every top-k
spectrum is refined by a float64 Rayleigh–Ritz step (the SVD of U_kᵀ W V_k, k×k, formed in float64 from the
computed subspaces, re-orthonormalised in float64): its values are off by the square of the subspace error,
far below the drift (2e-9 relative against float64 SVDs on a 1024×1024 bf16 pair). Full SVDs run
in float64 up to :data:`FLOAT64_MAX_ELEMENTS` (cheap there) and float32 above. Δ's spectrum is taken in float32,
as update_rank does, so the numerical rank is the same number.

Cost. Exact (``method="exact"``): full SVDs of W0 and W1 and svdvals of Δ. Above ``exact_max_elements`` the
top-k subspaces come from ``torch.svd_lowrank`` (q = k + oversample, ``niter`` power iterations), run with the
same seeded random sketch for W0 and W1 so that the sketch's error largely cancels in the angles and the drift,
which are differences between the two. Δ's spectrum stays exact (svdvals) up to ``delta_exact_max_elements``:
the energy ranks need the whole spectrum, and an RL update's spectrum is flat (no small q holds 90% of it).
Above that, ``delta_method="randomized"``: the top q singular values of Δ (4 power iterations) with q doubling
from 64 until they hold 99% of ‖Δ‖_F² or q reaches min(``delta_max_q``, min(m, n)/2); energy ranks not reached
are None (the rank exceeds q), as are the numerical and effective ranks (they need every singular value);
randomized singular values are lower bounds, so a randomized energy rank can only overestimate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch

from rlsubnet.diff.names import MODULE_KINDS, layer_of, module_kind
from rlsubnet.errors import MismatchError, UsageError

# The largest power of two that fits every 2-D matrix of the demo's models (the smallest is the 28-row embedding;
# a GQA LLM's k/v projections have 128 rows or more), so the default never stops a run. On the demo's pretrained
# base (hidden 128) σ_1/σ_16 is 3.6–10×: the top 16 are W0's dominant directions. How well a top-k subspace, and so
# an angle, is defined depends on the relative gap (σ_k − σ_{k+1})/σ_k: there its median is 9% at k = 8, 3% at
# k = 16 and 1% at k = 32; every record carries its own as top_k_gap.
DEFAULT_TOP_K = 16
# Full SVDs of W0 and W1 up to this many elements (2048×2048): single-threaded on the development machine an
# fp32 SVD with vectors takes 0.43 s at 1024² (measured), so ~3.5 s at 2048² and ~30 s at 4096² (n³), while
# the randomized top-k is as accurate as the fp32 SVD on benchmarks/spectral_bench.py's pairs.
EXACT_MAX_ELEMENTS = 1 << 22
# svdvals of Δ up to this many elements: covers 4096×11008 (45M) and every matrix of a 7B model but the
# embeddings; svdvals costs about half an SVD with vectors.
DELTA_EXACT_MAX_ELEMENTS = 1 << 26
FLOAT64_MAX_ELEMENTS = 1 << 18  # full SVDs in float64 up to 512×512, where they take milliseconds
# Power iterations of the randomized sketch. The top-k singular values of an LLM matrix are barely separated
# from the next ones (σ_{2k}/σ_k ~ 0.9), and the sketch's subspace error shrinks as that ratio to the 2·niter+1:
# on benchmarks/spectral_bench.py's 1024×1024 pair, niter 4 leaves 0.05° of error on a 0.16° angle and 5% on
# the drift, niter 16 leaves 3e-6° and 2e-7 (1.37 s against 1.14 s per matrix, most of it svdvals of Δ).
NITER = 16
# Δ's sketch is wide (q up to 1024) and its spectrum flat: more power iterations cost more than svdvals would.
DELTA_NITER = 4
DELTA_Q_START = 64
DELTA_MAX_Q = 1024
ENERGY_FRACTIONS = (0.9, 0.99)
ENERGY_RTOL = 1e-6
_ROW_CHUNK = 1 << 20  # elements per float64 chunk when projecting a matrix: no float64 copy of the whole matrix

# The per-matrix metrics, in record order; every one is averaged by :func:`aggregate`.
METRICS = (
    "numerical_rank",
    "stable_rank",
    "effective_rank",
    "energy_rank_90",
    "energy_rank_99",
    "principal_energy",
    "principal_energy_chance",
    "principal_energy_left",
    "principal_energy_left_chance",
    "principal_energy_right",
    "principal_energy_right_chance",
    "principal_angle_left",
    "principal_angle_right",
    "spectral_drift",
    "top_k_gap",
)


@dataclass
class SpectralStats:
    """Spectral metrics of one matrix's update; None where undefined (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    top_k: int
    method: str | None = None  # "exact" when every part was computed exactly, else "randomized"
    subspace_method: str | None = None  # how W0's and W1's top-k subspaces were found
    delta_method: str | None = None  # how Δ's spectrum was found
    nonfinite: bool = False
    numerical_rank: int | None = None
    stable_rank: float | None = None
    effective_rank: float | None = None
    energy_rank_90: int | None = None
    energy_rank_99: int | None = None
    principal_energy: float | None = None
    principal_energy_chance: float | None = None
    principal_energy_left: float | None = None
    principal_energy_left_chance: float | None = None
    principal_energy_right: float | None = None
    principal_energy_right_chance: float | None = None
    principal_angle_left: float | None = None
    principal_angle_right: float | None = None
    spectral_drift: float | None = None
    # (σ_k − σ_{k+1}) / σ_k of W0: a small gap makes the top-k subspace, and so the angles, ill-determined.
    top_k_gap: float | None = None

    def to_record(self) -> dict:
        """JSON-ready dict: the name, its layer and module kind, the methods, then every metric."""
        rec: dict = {"name": self.name, "layer": layer_of(self.name), "module": module_kind(self.name)}
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            rec[f.name] = list(value) if f.name == "shape" else value
        return rec


def check_top_k(top_k, shape: Sequence[int], name: str = "") -> None:
    """UsageError unless 1 ≤ top_k ≤ min(m, n)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {top_k!r}")
    if top_k > min(shape):
        what = f"{name!r} " if name else ""
        raise UsageError(
            f"--top-k {top_k} is larger than matrix {what}of shape {'×'.join(map(str, shape))} (at most {min(shape)})"
        )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """The global generator seeded inside the block and restored after: svd_lowrank takes no generator."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _sq_norm(x: torch.Tensor) -> float:
    """‖x‖_F², accumulated in float64 a chunk of rows at a time."""
    rows = max(1, _ROW_CHUNK // max(1, x.shape[-1]))
    return float(sum(x[i : i + rows].double().square().sum() for i in range(0, x.shape[0], rows)))


def _project(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """uᵀ w v in float64 (u, v float64), a chunk of w's rows at a time."""
    rows = max(1, _ROW_CHUNK // max(1, w.shape[1]))
    out = torch.zeros(u.shape[1], v.shape[1], dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], rows):
        out += u[i : i + rows].mT @ (w[i : i + rows].double() @ v)
    return out


def _rank_tol(sigma_max: float, shape: Sequence[int]) -> float:
    return sigma_max * max(shape) * torch.finfo(torch.float32).eps


def _top_subspaces(w, k, exact, svd_dtype, oversample, niter, seed):
    """(U_k, σ, V_k): W's top-k singular vectors (float64) and its leading singular values, σ refined in float64
    (k+1 of them when available, for the gap)."""
    m, n = w.shape
    r = min(m, n)
    if exact:
        u, s, vh = torch.linalg.svd(w.to(svd_dtype), full_matrices=False)
        keep = min(r, k + 1)
        u, v = u[:, :keep], vh[:keep].mT
        del s, vh
    else:
        q = min(r, k + oversample)
        with _seeded(seed, w.device):
            u, _, v = torch.svd_lowrank(w.float(), q=q, niter=niter)
    # Re-orthonormalised in float64: float32 bases are orthonormal only to ~1e-7, which would put a first-order
    # error of that size on the Ritz values below.
    u, v = torch.linalg.qr(u.double()).Q, torch.linalg.qr(v.double()).Q
    # Rayleigh–Ritz: the SVD of uᵀ w v, formed in float64, rotates the bases onto W's singular vectors within
    # their span and gives its singular values to the square of the subspace error.
    ub, s, vbh = torch.linalg.svd(_project(w, u, v))
    return (u @ ub)[:, :k], s, (v @ vbh.mT)[:, :k]


def _largest_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between span(a) and span(b) (orthonormal columns, float64), in degrees."""
    m = a.mT @ b
    cos_min = float(torch.linalg.svdvals(m).clamp(0.0, 1.0).min())
    if cos_min <= math.cos(math.pi / 4):
        return math.degrees(math.acos(cos_min))
    sin_max = float(torch.linalg.svdvals(b - a @ m).max().clamp(0.0, 1.0))
    return math.degrees(math.asin(sin_max))


def _energy_ranks(energy: torch.Tensor, total: float) -> list[int | None]:
    """For each fraction f: the fewest leading directions whose energy (σ², float64) reaches f·total, or None
    when the given ones do not reach it."""
    cum = torch.cumsum(energy, 0)
    out: list[int | None] = []
    for f in ENERGY_FRACTIONS:
        target = torch.tensor([f * total * (1 - ENERGY_RTOL)], dtype=cum.dtype)
        j = int(torch.searchsorted(cum, target))
        out.append(j + 1 if j < len(cum) else None)
    return out


def _delta_spectrum(stats: SpectralStats, d: torch.Tensor, exact: bool, max_q: int, seed: int):
    m, n = d.shape
    r = min(m, n)
    if exact:
        sv = torch.linalg.svdvals(d)
        energy = sv.double().square()
        total = float(energy.sum())
        tol = _rank_tol(float(sv[0]), d.shape)
        above = sv.double()[sv > tol]
        stats.numerical_rank = int(above.numel())
        stats.stable_rank = total / float(energy[0])
        p = above / above.sum()
        stats.effective_rank = math.exp(float(-(p * p.log()).sum()))
        stats.energy_rank_90, stats.energy_rank_99 = _energy_ranks(energy, total)
        return
    total = _sq_norm(d)
    cap = max(1, min(max_q, r // 2))  # past half the rank, svdvals is cheaper than the sketch
    q = min(cap, DELTA_Q_START)
    while True:
        with _seeded(seed, d.device):
            _, sv, _ = torch.svd_lowrank(d, q=min(r, q + 10), niter=DELTA_NITER)
        energy = sv[:q].double().square()
        ranks = _energy_ranks(energy, total)
        if ranks[-1] is not None or q >= cap:
            break
        q = min(2 * q, cap)
    stats.stable_rank = total / float(energy[0])
    stats.energy_rank_90, stats.energy_rank_99 = ranks


def spectral_stats(
    w0: torch.Tensor,
    w1: torch.Tensor,
    delta: torch.Tensor | None = None,
    top_k: int = DEFAULT_TOP_K,
    *,
    name: str = "",
    exact_max_elements: int = EXACT_MAX_ELEMENTS,
    delta_exact_max_elements: int = DELTA_EXACT_MAX_ELEMENTS,
    oversample: int | None = None,
    niter: int = NITER,
    delta_max_q: int = DELTA_MAX_Q,
    seed: int = 0,
    svd_dtype: torch.dtype | None = None,
) -> SpectralStats:
    """Spectral metrics of one update (module docstring). ``delta`` is Δ in the comparison dtype (default
    ``w1 − w0`` in float32); it is taken in float32. ``w1`` is the tuned matrix as the comparison should see it.
    ``oversample`` defaults to max(10, k): q = 2k sketches keep the top-k subspace accurate when the spectrum
    decays slowly, as in trained LLM matrices. ``svd_dtype`` overrides the dtype of the full SVDs (float64 up to
    :data:`FLOAT64_MAX_ELEMENTS`, float32 above). Memory: float32 copies of one matrix and its factors."""
    if w0.dim() != 2 or w0.shape != w1.shape or (delta is not None and delta.shape != w0.shape):
        shapes = ", ".join(str(tuple(t.shape)) for t in (w0, w1, delta) if t is not None)
        raise MismatchError(f"spectral metrics of {name or 'a matrix'} need 2-D tensors of one shape, got {shapes}")
    m, n = w0.shape
    check_top_k(top_k, (m, n), name)
    k = top_k
    stats = SpectralStats(name=name, shape=(m, n), top_k=k)
    d = (w1.float() - w0.float()) if delta is None else delta.float()
    if not all(bool(torch.isfinite(t).all()) for t in (w0, w1, d)):
        stats.nonfinite = True
        return stats
    exact = m * n <= exact_max_elements
    delta_exact = m * n <= delta_exact_max_elements
    stats.subspace_method = "exact" if exact else "randomized"
    stats.delta_method = "exact" if delta_exact else "randomized"
    stats.method = "exact" if exact and delta_exact else "randomized"
    if svd_dtype is None:
        svd_dtype = torch.float64 if m * n <= FLOAT64_MAX_ELEMENTS else torch.float32
    oversample = max(10, k) if oversample is None else oversample
    stats.principal_energy_chance = k * k / (m * n)
    stats.principal_energy_left_chance = k / m
    stats.principal_energy_right_chance = k / n

    total = _sq_norm(d)
    if total == 0.0:
        stats.numerical_rank = stats.energy_rank_90 = stats.energy_rank_99 = 0
        stats.stable_rank = stats.effective_rank = 0.0
    else:
        _delta_spectrum(stats, d, delta_exact, delta_max_q, seed)

    u0, s0, v0 = _top_subspaces(w0, k, exact, svd_dtype, oversample, niter, seed)
    if total > 0.0:
        u0f, v0f = u0.to(d.dtype), v0.to(d.dtype)
        left = u0f.mT @ d  # k×n
        stats.principal_energy = _sq_norm(left @ v0f) / total
        stats.principal_energy_left = _sq_norm(left) / total
        stats.principal_energy_right = _sq_norm(d @ v0f) / total
        del left, u0f, v0f
    del d
    u1, s1, v1 = _top_subspaces(w1, k, exact, svd_dtype, oversample, niter, seed)

    norm0 = float(s0[:k].norm())
    if norm0 > 0.0:
        stats.spectral_drift = float((s1[:k] - s0[:k]).norm()) / norm0
    if len(s0) > k and float(s0[k - 1]) > 0.0:
        stats.top_k_gap = float((s0[k - 1] - s0[k]) / s0[k - 1])
    defined = all(float(s[k - 1]) > _rank_tol(float(s[0]), (m, n)) for s in (s0, s1))
    if defined:
        stats.principal_angle_left = _largest_angle_deg(u0, u1)
        stats.principal_angle_right = _largest_angle_deg(v0, v1)
    return stats


def summarise(records: Iterable[dict]) -> dict:
    """The unweighted mean of each metric over the records where it is defined (None where it is defined for
    none), the number of matrices measured, and how many were skipped as non-finite."""
    group = list(records)
    ok = [r for r in group if not r.get("nonfinite")]
    out: dict = {"matrices": len(ok), "nonfinite": len(group) - len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def aggregate(records: Iterable[dict]) -> dict:
    """Per layer and per module kind: the unweighted mean of each metric over the matrices where it is
    defined (None where it is defined for none), the number of matrices, and how many were skipped as
    non-finite. Records are :meth:`SpectralStats.to_record` dicts; "layer"/"module" are derived from "name"
    when absent. Matrices outside the blocks (layer None) appear in the modules only."""
    layers: dict[int, list[dict]] = {}
    modules: dict[str, list[dict]] = {}
    for rec in records:
        layer = rec["layer"] if "layer" in rec else layer_of(rec["name"])
        kind = rec["module"] if "module" in rec else module_kind(rec["name"])
        if layer is not None:
            layers.setdefault(layer, []).append(rec)
        modules.setdefault(kind, []).append(rec)

    order = {kind: i for i, kind in enumerate(MODULE_KINDS)}
    return {
        "layers": [{"layer": layer, **summarise(layers[layer])} for layer in sorted(layers)],
        "modules": [
            {"module": kind, **summarise(modules[kind])}
            for kind in sorted(modules, key=lambda x: (order.get(x, len(order)), x))
        ],
    }
