"""``rlsubnet.predict(base, plan, probe=None)``: the per-entry probability that training changes a stored weight.

θ0 is read in flat blocks of about CHUNK entries (small tensors share one, large ones are cut); for each entry
the rounding distances (:mod:`.rounding`) meet the drift models (:mod:`.models`): *budget* from the plan alone,
*probe* from K recorded steps, *calibrated* a logistic rule over both (:mod:`.calibrate`) fitted on another run.
Entries a probe already changed count as changed (probability 1) for the probe and calibrated predictors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.checkpoint.hashing import combine_hashes, hash_tensor
from rlsubnet.diff.changed import ChangedTest
from rlsubnet.errors import MismatchError, UsageError, listing
from rlsubnet.predict.choices import PREDICTORS
from rlsubnet.predict.models import (
    SteadinessPosterior,
    UniformSteadinessTail,
    budget_changed,
    fit_prior_beta,
    normal_changed,
)
from rlsubnet.predict.plan import Plan
from rlsubnet.predict.prediction import Prediction
from rlsubnet.predict.probe import ProbeError, ProbeStats
from rlsubnet.predict.rounding import change_distances

CHUNK = 1 << 21  # entries per block (a multiple of 8, as mask blocks need): a few float64 temporaries of it live


@dataclass
class Terms:
    """What every predictor reads about one chunk of one tensor (flat, float64 unless noted)."""

    name: str
    start: int
    w0: torch.Tensor  # θ0 as stored
    up: torch.Tensor
    down: torch.Tensor
    decay_drift: torch.Tensor  # known drift of decoupled weight decay over the run
    p_budget: torch.Tensor | None
    p_probe: torch.Tensor | None = None
    already: torch.Tensor | None = None  # bool: changed after the probe's K steps
    mean: torch.Tensor | None = None  # predicted total drift at T
    std: torch.Tensor | None = None
    steadiness: torch.Tensor | None = None  # |μ̂| / rms
    probe_steps: int = 0


def as_plan(plan) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_json(dict(plan))
    raise UsageError(f"expected a Plan (or its JSON record), got {type(plan).__name__}")


def as_probe(probe) -> ProbeStats | None:
    if probe is None or isinstance(probe, ProbeStats):
        return probe.check() if probe is not None else None
    if isinstance(probe, (str, Path)):
        return ProbeStats.load(probe)
    raise UsageError(f"expected ProbeStats or a probe file, got {type(probe).__name__}")


def resolve_predictor(predictor: str | None, plan: Plan, probe: ProbeStats | None, calibration) -> str:
    if predictor is None:
        predictor = "calibrated" if calibration is not None else "probe" if probe is not None else "budget"
    if predictor not in PREDICTORS:
        raise UsageError(f"unknown --predictor {predictor!r} (choose from {', '.join(PREDICTORS)})")
    if predictor == "probe" and probe is None:
        raise UsageError("the probe predictor needs a probe (--probe FILE)")
    if predictor == "calibrated" and calibration is None:
        raise UsageError("the calibrated predictor needs a calibration (--calibration FILE, from --fit)")
    if plan.optimizer == "sgd" and probe is None:
        raise UsageError(
            "the plan's optimizer is sgd, whose step is lr·|g|: the budget predictor needs the gradient scale "
            "from a probe (--probe FILE)"
        )
    if probe is not None and probe.steps > plan.total_steps:
        raise UsageError(f"the probe ran {probe.steps} steps, more than the plan's {plan.steps} (--steps)")
    return predictor


def _blocks(ck) -> Iterator[list[tuple[str, int, int]]]:
    """Runs of (tensor, start, stop) pieces in storage order, about CHUNK entries each: small tensors share a
    block (the per-call work of the rounding search is paid once per block), large ones are cut."""
    pending: list[tuple[str, int, int]] = []
    size = 0
    for name in ck.names():
        numel = ck.info(name).numel
        for start in range(0, numel, CHUNK):
            stop = min(numel, start + CHUNK)
            if pending and size + stop - start > CHUNK:
                yield pending
                pending, size = [], 0
            pending.append((name, start, stop))
            size += stop - start
    if pending:
        yield pending


def iter_terms(ck, plan: Plan, probe: ProbeStats | None, *, need_budget: bool = True) -> Iterator[Terms]:
    """Terms of every chunk of every tensor of the open checkpoint ``ck``, in its storage order."""
    l1, l2 = plan.budget()
    tail = UniformSteadinessTail(l1, l2) if need_budget and plan.optimizer != "sgd" else None
    decay_all = plan.decay_factor() - 1.0 if plan.optimizer == "adamw" else 0.0
    posteriors: dict[str, SteadinessPosterior] = {}
    for block in _blocks(ck):
        w0 = torch.cat([ck.read_flat(name, start, stop).to(plan.storage) for name, start, stop in block])
        up, down = change_distances(w0, plan.storage, plan.atol, plan.mode)
        decay = torch.cat(
            [
                torch.full((stop - start,), decay_all if len(ck.info(name).shape) >= 2 else 0.0, dtype=torch.float64)
                for name, start, stop in block
            ]
        )
        decay_drift = torch.nan_to_num(w0.to(torch.float64) * decay, nan=0.0, posinf=0.0, neginf=0.0)
        p_budget = budget_changed(tail, up, down, decay_drift) if tail is not None else None
        at = 0
        for name, start, stop in block:
            piece = slice(at, at + stop - start)
            at = piece.stop
            t = Terms(name, start, w0[piece], up[piece], down[piece], decay_drift[piece], None)
            if p_budget is not None:
                t.p_budget = p_budget[piece]
            if probe is not None:
                if name not in posteriors:
                    posteriors.clear()  # one tensor at a time: pieces of a tensor are consecutive
                    beta = fit_prior_beta(_signed_steadiness(probe, name).reshape(-1), probe.steps)
                    posteriors[name] = SteadinessPosterior(probe.steps, prior_beta=beta)
                decayed = bool(decay[piece.start]) if stop > start else False
                _probe_terms(t, plan, probe, start, stop, decayed, posteriors[name])
            yield t


def _signed_steadiness(probe: ProbeStats, name: str) -> torch.Tensor:
    """ĉ = μ̂ / rms of the probe's gradients (0 where there were none)."""
    s1, s2 = probe.grad_sum[name].to(torch.float64), probe.grad_sq[name].to(torch.float64)
    rms = (s2 / probe.steps).sqrt()
    return torch.where(rms > 0, (s1 / probe.steps) / rms.clamp_min(1e-300), torch.zeros_like(rms)).clamp(-1, 1)


def _probe_terms(
    t: Terms, plan: Plan, probe: ProbeStats, start: int, stop: int, decayed: bool, posterior: SteadinessPosterior
) -> None:
    """The probe predictor's drift distribution for one chunk (see :mod:`.models`)."""
    k = t.probe_steps = probe.steps
    piece = lambda d: d[t.name].reshape(-1)[start:stop].to(torch.float64)  # noqa: E731
    w0 = t.w0.to(torch.float64)
    master = piece(probe.master)
    s1, s2 = piece(probe.grad_sum), piece(probe.grad_sq)
    wd = plan.weight_decay if (plan.optimizer != "adamw" and len(probe.master[t.name].shape) >= 2) else 0.0
    if wd:  # L2 weight decay (Adam, SGD) joins the gradient the optimizer steps on
        s2 = s2 + 2 * wd * w0 * s1 + k * (wd * w0) ** 2
        s1 = s1 + k * wd * w0
    mu = s1 / k
    rms = (s2 / k).clamp_min(0.0).sqrt()
    # the unit step's scale: Adam's normalised step is ≈ rms / (rms + eps) ≤ 1; SGD's is rms / (1 − momentum)
    scale = rms / (rms + plan.eps) if plan.optimizer != "sgd" else rms / (1.0 - plan.momentum)
    l1f, l2f = plan.budget(start=k)
    base_mean = master - w0  # the drift so far
    if decayed and plan.optimizer == "adamw":
        base_mean = base_mean + w0 * (plan.decay_factor(start=k) - 1.0)
    c_hat = torch.where(rms > 0, mu / rms.clamp_min(1e-300), torch.zeros_like(rms)).clamp(-1, 1)
    # descent: the drift goes against the mean gradient
    t.mean, t.std = posterior.drift(c_hat, base_mean, scale * l1f, scale * l2f)
    test = ChangedTest(plan.storage, plan.storage, plan.atol, plan.mode)
    stored_k = master.to(torch.float32).to(plan.storage)
    t.already = torch.from_numpy(test.changed(t.w0, stored_k)[0].copy())
    p = normal_changed(t.mean, t.std, t.up, t.down)
    t.p_probe = torch.where(t.already, torch.ones_like(p), p)
    t.steadiness = c_hat.abs()


def open_base(base, plan: Plan, probe: ProbeStats | None, **opts):
    """The checkpoint θ0, checked: float tensors only, the probe's tensors and shapes."""
    ck = open_checkpoint(base, label="base", **opts)
    try:
        bad = [n for n, i in ck.infos.items() if not i.dtype.is_floating_point]
        if bad:
            raise UsageError(
                f"{ck.location}: tensor {bad[0]!r} is {str(ck.infos[bad[0]].dtype).removeprefix('torch.')}: "
                "predict covers float tensors only (a base with non-float tensors)"
            )
        if probe is not None:
            shapes = {n: tuple(i.shape) for n, i in ck.infos.items()}
            pshapes = probe.shapes
            missing = [n for n in shapes if n not in pshapes]
            extra = [n for n in pshapes if n not in shapes]
            differ = [n for n in shapes if n in pshapes and shapes[n] != pshapes[n]]
            if missing or extra or differ:
                raise MismatchError(
                    f"the probe is of another model than {ck.location}: "
                    + "; ".join(
                        f"{what} {listing(names)}"
                        for what, names in (
                            ("not in the probe:", missing),
                            ("not in the base:", extra),
                            ("shapes differ:", differ),
                        )
                        if names
                    )
                )
    except BaseException:
        ck.close()
        raise
    return ck


def predict(
    base,
    plan,
    probe=None,
    *,
    predictor: str | None = None,
    calibration=None,
    allow_pickle: bool = False,
    allow_download: bool = False,
) -> Prediction:
    """The probability that each entry of θ0 (``base``: anything :func:`rlsubnet.open_checkpoint` opens) counts
    as changed after the run ``plan``, at the plan's atol and comparison mode.

    ``probe``: :class:`~rlsubnet.predict.probe.ProbeStats` or a probe file. ``predictor``: ``budget``, ``probe``
    or ``calibrated`` (default: the most informed one the inputs allow). ``calibration``: a
    :class:`~rlsubnet.predict.calibrate.Calibration` or its file, fitted on another run."""
    from rlsubnet.masks.build import checkpoint_record

    plan = as_plan(plan)
    probe = as_probe(probe)
    if calibration is not None:
        from rlsubnet.predict.calibrate import as_calibration

        calibration = as_calibration(calibration)
        calibration.check_can_predict(plan, probe)
    predictor = resolve_predictor(predictor, plan, probe, calibration)
    if predictor == "budget":
        probe = None  # the budget predictor reads θ0 and the plan only
    ck = open_base(base, plan, probe, allow_pickle=allow_pickle, allow_download=allow_download)
    try:
        probs = {n: torch.empty(i.numel, dtype=torch.float32) for n, i in ck.infos.items()}
        shapes = {n: tuple(i.shape) for n, i in ck.infos.items()}
        hashes = {}
        initial: dict[str, str] = {}
        # the probe predictor does not read the budget's probabilities: they are not computed for it
        for t in iter_terms(ck, plan, probe, need_budget=predictor != "probe"):
            if predictor == "calibrated":
                p = calibration.probabilities(t, plan)
            elif predictor == "probe":
                p = t.p_probe
            else:
                p = t.p_budget
            probs[t.name][t.start : t.start + t.w0.numel()] = p.to(torch.float32)
        for name in ck.names():
            stored = ck.read(name)
            hashes[name] = hash_tensor(name, stored)
            if probe is not None and probe.initial_hash:
                initial[name] = hash_tensor(name, stored.to(torch.float32).contiguous())
        if probe is not None and probe.initial_hash and combine_hashes(initial) != probe.initial_hash:
            raise ProbeError(f"the probe started from other weights than {ck.location} (its initial hash differs)")
        record = checkpoint_record(ck, hashes)
    finally:
        ck.close()
    meta = {
        "predictor": predictor,
        "plan": plan.to_json(),
        "base": record,
        "probe": probe.summary() if probe is not None else None,
        "calibration": calibration.describe() if calibration is not None else None,
    }
    return Prediction({n: probs[n].reshape(shapes[n]) for n in probs}, plan, meta)
