"""The calibrated predictor: a logistic rule over the budget and probe features, fitted on one run's realized mask
and applied only to other runs.

Features per entry, all scale-free (distances and drifts in units of the run's Σ lr_t, so a rule fitted at one
learning rate reads another): log₂ of the nearer and the farther rounding distance, log₂|w|, the budget
predictor's logit, the module kind (one-hot); with a probe also the probe predictor's logit, the two z-scores
of its normal drift against the boundaries above and below, log₂ of its mean drift over the distance in that
direction and of its spread over the nearer distance, and the steadiness |ĉ| of the probe's gradients. Entries
the probe already changed are left out of the fit (they are predicted changed outright). The fit is Newton's
method on the L2-regularised log-loss over a seeded sample of at most ``max_entries`` entries: deterministic.

A calibration records the run it was fitted on (the probe's run id and the SHA-256 of the realized mask's
bits): predicting that run with it, or scoring a prediction against that mask, is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlsubnet.diff.names import MODULE_KINDS, module_kind
from rlsubnet.errors import RlsubnetError, UsageError
from rlsubnet.fileio import atomic_write_text, locks_output
from rlsubnet.predict.models import finite_or, logit, safe_log2

FORMAT = "rlsubnet.calibration"
BUDGET_FEATURES = ("log_dist_near", "log_dist_far", "log_abs_w", "budget_logit")
PROBE_FEATURES = ("probe_logit", "z_up", "z_down", "log_reach", "log_spread", "steadiness")
KIND_FEATURES = tuple(f"kind:{k}" for k in MODULE_KINDS)


class CalibrationLeakError(RlsubnetError):
    """A calibration would see the run it is asked to predict or to be scored on."""


def features(t, plan, use_probe: bool) -> torch.Tensor:
    """[n, F] float32 features of one chunk of terms (:class:`rlsubnet.predict.core.Terms`)."""
    l1 = max(plan.budget()[0], 1e-300)
    up = (t.up - t.decay_drift).clamp_min(0.0)
    down = (t.down + t.decay_drift).clamp_min(0.0)
    near, far = torch.minimum(up, down), torch.maximum(up, down)
    p_budget = t.p_budget if t.p_budget is not None else torch.full_like(up, 0.5)
    cols = [
        safe_log2(near / l1),
        safe_log2(far / l1),
        safe_log2(finite_or(t.w0.to(torch.float64), 0.0) / l1),
        logit(p_budget),
    ]
    if use_probe:
        std = t.std.clamp_min(1e-300)
        toward = torch.where(t.mean >= 0, t.up, t.down).clamp_min(1e-300)
        cols += [
            logit(t.p_probe),
            ((t.mean - t.up) / std).clamp(-40.0, 40.0),
            ((-t.mean - t.down) / std).clamp(-40.0, 40.0),
            safe_log2(t.mean / toward),
            safe_log2(t.std / near.clamp_min(1e-300)),
            t.steadiness,
        ]
    kind = module_kind(t.name)
    onehot = torch.zeros(up.numel(), len(KIND_FEATURES), dtype=torch.float64)
    if kind in MODULE_KINDS:
        onehot[:, MODULE_KINDS.index(kind)] = 1.0
    x = torch.cat([torch.stack(cols, 1), onehot], 1)
    return finite_or(x, 0.0).to(torch.float32)


@dataclass
class Calibration:
    """A fitted logistic rule and the run it was fitted on."""

    names: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    uses_probe: bool
    fitted_on: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        w = torch.tensor(self.weights)
        return ((x - mean) / std) @ w + self.bias

    def probabilities(self, t, plan) -> torch.Tensor:
        p = torch.sigmoid(self.logits(features(t, plan, self.uses_probe)).double())
        if self.uses_probe and t.already is not None:
            p = torch.where(t.already, torch.ones_like(p), p)
        return p

    # -- never on the run it saw
    def check_can_predict(self, plan, probe) -> None:
        if self.uses_probe and probe is None:
            raise UsageError("this calibration was fitted with probe features: the prediction needs a probe too")
        run = self.fitted_on.get("run_id")
        if probe is not None and run and probe.run_id == run:
            raise CalibrationLeakError(
                f"the calibration was fitted on run {run}, the run being predicted: fit it on another run "
                "(another seed, stage or task)"
            )

    def check_can_evaluate(self, realized_bits_sha256: str) -> None:
        if self.fitted_on.get("realized_bits_sha256") == realized_bits_sha256:
            raise CalibrationLeakError(
                "the prediction's calibration was fitted on this realized mask: a calibrated predictor is "
                "scored only on runs it did not see"
            )

    def describe(self) -> dict:
        return {
            "fitted_on": self.fitted_on,
            "uses_probe": self.uses_probe,
            "fit": self.fit,
            "weights": dict(zip(self.names, self.weights)),
        }

    # -- files
    @locks_output("path")
    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: no such calibration file") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable calibration file ({exc})") from None
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise UsageError(f"{path}: not an rlsubnet calibration (build one with `rlsubnet predict --fit`)")
        try:
            cal = cls(**d)
            n = len(cal.names)
            ok = len(cal.mean) == len(cal.std) == len(cal.weights) == n and all(
                math.isfinite(v) for v in [*cal.mean, *cal.std, *cal.weights, cal.bias]
            )
        except TypeError as exc:
            raise UsageError(f"{path}: corrupt calibration ({exc})") from None
        if not ok or cal.names != feature_names(cal.uses_probe):
            raise UsageError(f"{path}: corrupt calibration (its features do not match this version's)")
        return cal


def feature_names(use_probe: bool) -> list[str]:
    return [*BUDGET_FEATURES, *(PROBE_FEATURES if use_probe else ()), *KIND_FEATURES]


def as_calibration(spec) -> Calibration:
    if isinstance(spec, Calibration):
        return spec
    if isinstance(spec, (str, Path)):
        return Calibration.load(spec)
    raise UsageError(f"expected a Calibration or its file, got {type(spec).__name__}")


def fit_calibration(
    base,
    plan,
    realized,
    probe=None,
    *,
    run_id: str | None = None,
    max_entries: int = 200_000,
    l2: float = 1e-3,
    seed: int = 0,
    allow_pickle: bool = False,
    allow_download: bool = False,
) -> Calibration:
    """Fit the logistic rule on one finished run: θ0 ``base``, its ``plan``, its ``probe`` (optional: without
    one the rule reads the budget features only) and its ``realized`` mask. ``run_id`` names the run (default:
    the probe's); a seeded sample of at most ``max_entries`` entries enters the fit."""
    from rlsubnet.masks import as_mask
    from rlsubnet.predict.core import as_plan, as_probe, iter_terms, open_base, resolve_predictor

    plan, probe = as_plan(plan), as_probe(probe)
    realized = as_mask(realized)
    resolve_predictor("probe" if probe is not None else "budget", plan, probe, None)
    use_probe = probe is not None
    ck = open_base(base, plan, probe, allow_pickle=allow_pickle, allow_download=allow_download)
    try:
        shapes = {n: tuple(i.shape) for n, i in ck.infos.items()}
        diff = [n for n in shapes if n not in realized or realized.shape(n) != shapes[n]]
        if diff or len(realized) != len(shapes):
            raise UsageError(f"the realized mask {realized.meta.get('path') or ''} covers other tensors than the base")
        offsets, total = {}, 0
        for name in ck.names():
            offsets[name] = total
            total += ck.info(name).numel
        # the sample is drawn over the whole model's entries at once, so it does not depend on the chunking
        sample = torch.zeros(total, dtype=torch.bool)
        sample[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_entries]] = True
        xs, ys = [], []
        for t in iter_terms(ck, plan, probe):
            at = offsets[t.name] + t.start
            keep = sample[at : at + t.w0.numel()]
            if use_probe and t.already is not None:
                keep = keep & ~t.already
            y = torch.from_numpy(realized.flat_block(t.name, t.start, t.start + t.w0.numel()).copy())
            xs.append(features(t, plan, use_probe)[keep])
            ys.append(y[keep])
        base_rec = ck.source
    finally:
        ck.close()
    x, y = torch.cat(xs).to(torch.float64), torch.cat(ys).to(torch.float64)
    if x.shape[0] == 0 or float(y.sum()) in (0.0, float(x.shape[0])):
        raise UsageError("the realized mask gives nothing to fit: every entry left is changed, or none is")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b, loss = _logistic((x - mean) / std, y, l2)
    return Calibration(
        names=feature_names(use_probe),
        mean=mean.tolist(),
        std=std.tolist(),
        weights=w.tolist(),
        bias=float(b),
        uses_probe=use_probe,
        fitted_on={
            "run_id": run_id or (probe.run_id if probe is not None else None),
            "realized_bits_sha256": realized.bits_sha256(),
            "realized": realized.meta.get("path"),
            "base": str(base_rec),
            "plan": plan.to_json(),
        },
        fit={"entries": int(x.shape[0]), "positives": int(y.sum()), "log_loss": loss, "l2": l2, "seed": seed},
    )


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 50) -> tuple[torch.Tensor, float, float]:
    """Weights, bias and final mean log-loss of an L2-regularised logistic regression (the bias unpenalised),
    by Newton's method: the loss is convex, so a few damped steps from zero reach its minimum."""
    n, f = x.shape
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    xt = xb.T.contiguous()
    penalty = torch.full((f + 1,), 2 * l2, dtype=x.dtype)
    penalty[-1] = 0.0
    theta = torch.zeros(f + 1, dtype=x.dtype)

    def loss_at(th: torch.Tensor) -> float:
        z = xb @ th
        return float(torch.nn.functional.softplus(z).mean() - (y * z).mean() + l2 * (th[:-1] ** 2).sum())

    current = loss_at(theta)
    for _ in range(iters):
        p = torch.sigmoid(xb @ theta)
        grad = xt @ (p - y) / n + penalty * theta
        hess = (xt * (p * (1 - p))) @ xb / n + torch.diag(penalty) + 1e-9 * torch.eye(f + 1, dtype=x.dtype)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while True:  # damping: a full Newton step can overshoot where the curvature is tiny
            trial = loss_at(theta - scale * step)
            if trial <= current or scale < 1e-4:
                break
            scale /= 2
        if trial > current:
            break
        theta, improved, current = theta - scale * step, current - trial, trial
        if float(step.abs().max()) * scale < 1e-7 or improved < 1e-12:
            break
    z = xb @ theta
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
    return theta[:-1].to(torch.float32), float(theta[-1]), loss
