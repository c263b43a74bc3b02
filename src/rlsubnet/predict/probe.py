"""A probe: K steps of the real optimizer from θ0, and the per-entry statistics the probe predictor reads.

Per tensor: the fp32 master after K steps, the sum and the sum of squares of the gradient the optimizer saw at
each step (after clipping), and for Adam its moments ``exp_avg`` / ``exp_avg_sq`` at the end; plus the learning
rate of each probe step. :func:`run_probe` drives the optimizer of a :class:`~rlsubnet.predict.plan.Plan` with a
user callable that produces the gradients of the user's own model and data; :func:`rlsubnet.predict.lab_probe.
probe_stage` records the same from a lab stage's own TRL trainer.

File format (``format = "rlsubnet.probe"``): one safetensors file, tensors ``<kind>/<name>`` for kind in
``master``, ``grad_sum``, ``grad_sq`` (and ``exp_avg``, ``exp_avg_sq`` when recorded), all float32; metadata
``steps``, ``lrs``, ``optimizer``, ``initial_hash`` (the hash of the starting masters, so a probe is never applied
to another base), ``run_id`` and ``source`` as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlsubnet.checkpoint.hashing import combine_hashes, hash_tensor
from rlsubnet.checkpoint.index import read_safetensors_header
from rlsubnet.checkpoint.reader import SafetensorsCheckpoint
from rlsubnet.checkpoint.writer import SafetensorsWriter
from rlsubnet.errors import CheckpointError, RlsubnetError, UsageError
from rlsubnet.fileio import locks_output
from rlsubnet.predict.plan import Plan

FORMAT = "rlsubnet.probe"
KINDS = ("master", "grad_sum", "grad_sq", "exp_avg", "exp_avg_sq")
REQUIRED = KINDS[:3]


class ProbeError(RlsubnetError):
    """A probe that cannot be used: no gradient for a tensor, non-finite statistics, another model's probe."""


def initial_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Identity of the starting weights, as fp32 (a bf16 θ0 and its fp32 masters hash the same)."""
    return combine_hashes({n: hash_tensor(n, t.detach().to(torch.float32).contiguous()) for n, t in tensors.items()})


@dataclass
class ProbeStats:
    """What K probe steps recorded (see the module docstring). ``run_id`` names the full run the probe belongs
    to (a lab stage's fingerprint); a calibration fitted on that run refuses to predict it."""

    steps: int
    lrs: list[float]
    master: dict[str, torch.Tensor]
    grad_sum: dict[str, torch.Tensor]
    grad_sq: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    initial_hash: str | None = None
    run_id: str | None = None
    source: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.master)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.master.items()}

    def check(self, where: str = "probe") -> ProbeStats:
        """Every tensor recorded for every kind, same shapes, finite values; at least 2 steps."""
        if self.steps < 2:
            raise ProbeError(
                f"{where}: a probe needs at least 2 steps to tell steady drift from noise, got {self.steps}"
            )
        if len(self.lrs) != self.steps:
            raise ProbeError(f"{where}: {len(self.lrs)} learning rates recorded for {self.steps} steps")
        for kind in KINDS:
            got = getattr(self, kind)
            if kind not in REQUIRED and not got:
                continue
            missing = [n for n in self.master if n not in got]
            if missing:
                raise ProbeError(f"{where}: no {kind} recorded for tensor {missing[0]!r}")
            for n, t in got.items():
                if n not in self.master or tuple(t.shape) != tuple(self.master[n].shape):
                    raise ProbeError(f"{where}: {kind} of tensor {n!r} does not match the masters")
                if not bool(torch.isfinite(t).all()):
                    raise ProbeError(f"{where}: tensor {n!r} has non-finite {kind} (the probe diverged)")
        return self

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "lrs": {"first": self.lrs[0], "last": self.lrs[-1], "sum": math.fsum(self.lrs)},
            "optimizer": self.optimizer,
            "run_id": self.run_id,
            "initial_hash": self.initial_hash,
            "source": self.source,
            "adam_moments": bool(self.exp_avg),
        }

    # -- files
    @locks_output("path")
    def save(self, path: str | Path) -> Path:
        specs, tensors = [], []
        for kind in KINDS:
            for n, t in getattr(self, kind).items():
                specs.append((f"{kind}/{n}", torch.float32, tuple(t.shape)))
                tensors.append(t.detach().to(torch.float32).contiguous())
        meta = {
            "format": FORMAT,
            "steps": str(self.steps),
            "lrs": json.dumps(self.lrs),
            "optimizer": json.dumps(self.optimizer, sort_keys=True),
            "initial_hash": json.dumps(self.initial_hash),
            "run_id": json.dumps(self.run_id),
            "source": json.dumps(self.source, sort_keys=True, default=str),
        }
        with SafetensorsWriter(path, specs, meta) as w:
            for (name, _, _), t in zip(specs, tensors):
                w.write(name, t)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ProbeStats:
        path = Path(path)
        if not path.is_file():
            raise ProbeError(f"{path}: no such probe file")
        try:
            infos, md = read_safetensors_header(path)
        except CheckpointError as exc:
            raise ProbeError(f"not a readable probe file: {exc}") from None
        if md.get("format") != FORMAT:
            raise ProbeError(f"{path}: not an rlsubnet probe (metadata format is {md.get('format')!r})")
        try:
            steps = int(md["steps"])
            lrs = [float(x) for x in json.loads(md["lrs"])]
            extra = {k: json.loads(md.get(k, "null")) for k in ("optimizer", "initial_hash", "run_id", "source")}
        except (KeyError, ValueError, TypeError) as exc:
            raise ProbeError(f"{path}: corrupt probe metadata ({type(exc).__name__}: {exc})") from None
        parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
        ck = SafetensorsCheckpoint(str(path), str(path), [path])
        try:
            for key in infos:
                kind, _, name = key.partition("/")
                if kind not in parts or not name:
                    raise ProbeError(f"{path}: unexpected tensor {key!r} in a probe file")
                parts[kind][name] = ck.read(key).to(torch.float32)
        except CheckpointError as exc:
            raise ProbeError(f"corrupt probe file: {exc}") from None
        finally:
            ck.close()
        stats = cls(
            steps=steps,
            lrs=lrs,
            **parts,
            optimizer=extra["optimizer"] or {},
            initial_hash=extra["initial_hash"],
            run_id=extra["run_id"],
            source=extra["source"] or {},
        )
        return stats.check(str(path))


class GradientRecorder:
    """Accumulates Σg and Σg² per parameter at every optimizer step (a step pre-hook: the gradient the optimizer
    is about to use, after clipping), and the learning rate of the step.

    With ``limit`` K it records the first K steps of a longer run: after the K-th step (a post-hook) it takes the
    probe's statistics (``final``: the masters and moments as they are then) and records nothing more, so the run
    goes on unchanged and its first K steps are the probe."""

    def __init__(self, named_params: Mapping[str, torch.nn.Parameter], limit: int | None = None):
        self.params = dict(named_params)
        self.grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.grad_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.lrs: list[float] = []
        self.limit = limit
        self.final: ProbeStats | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stats_kw: dict = {}

    def attach(self, optimizer: torch.optim.Optimizer, **stats_kw) -> torch.optim.Optimizer:
        """Record ``optimizer``'s steps; ``stats_kw`` go to :meth:`stats` when the limit is reached."""
        self.optimizer = optimizer
        self.handles.append(optimizer.register_step_pre_hook(self._before_step))
        if self.limit is not None:
            self._stats_kw = stats_kw
            self.handles.append(optimizer.register_step_post_hook(self._after_step))
        return optimizer

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.final is not None:
            return  # a hook cannot remove itself while the optimizer runs its hooks: it goes quiet instead
        for name, p in self.params.items():
            if p.grad is None:
                raise ProbeError(
                    f"the probe produced no gradient for tensor {name!r} at step {len(self.lrs) + 1} "
                    "(a parameter the loss does not reach; freeze it or leave it out of the plan)"
                )
            g = p.grad.detach().to(torch.float32)
            self.grad_sum[name] += g
            self.grad_sq[name] += g * g
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.final is None and len(self.lrs) == self.limit:
            self.final = self.stats(len(self.lrs), **self._stats_kw)

    def adam_moments(self) -> tuple[dict, dict]:
        """``exp_avg`` and ``exp_avg_sq`` of an Adam-family optimizer at the end (empty for others)."""
        m, v = {}, {}
        for name, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            if "exp_avg" in st and "exp_avg_sq" in st:
                m[name] = st["exp_avg"].detach().to(torch.float32).clone()
                v[name] = st["exp_avg_sq"].detach().to(torch.float32).clone()
        return (m, v) if len(m) == len(self.params) else ({}, {})

    def stats(self, steps: int, **kw) -> ProbeStats:
        m, v = self.adam_moments()
        master = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
        return ProbeStats(
            steps=steps,
            lrs=list(self.lrs),
            master=master,
            grad_sum=self.grad_sum,
            grad_sq=self.grad_sq,
            exp_avg=m,
            exp_avg_sq=v,
            optimizer=describe_optimizer(self.optimizer),
            **kw,
        )

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def describe_optimizer(opt) -> dict:
    g = opt.param_groups[0]
    d: dict[str, object] = {"class": f"{type(opt).__module__}.{type(opt).__qualname__}"}
    d.update({k: (list(g[k]) if k == "betas" else g[k]) for k in ("betas", "eps", "momentum") if k in g})
    d["weight_decay"] = sorted({float(gr.get("weight_decay", 0.0)) for gr in opt.param_groups})
    return d


def unique_named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters, each once (a tied weight under its first name, as checkpoints store it)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def plan_optimizer(plan: Plan, params: Mapping[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The plan's optimizer over ``params`` (weight decay on tensors of two or more dimensions)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": plan.weight_decay}, {"params": rest, "weight_decay": 0.0})
        if g["params"]
    ]
    if plan.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=plan.lr, momentum=plan.momentum, foreach=False)
    cls = torch.optim.AdamW if plan.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=plan.lr, betas=plan.betas, eps=plan.eps, foreach=False)


def run_probe(
    model: torch.nn.Module,
    grad_fn: Callable[[torch.nn.Module, int], object],
    plan: Plan,
    steps: int,
    *,
    run_id: str | None = None,
    restore: bool = True,
) -> ProbeStats:
    """Run ``steps`` optimizer steps of ``plan`` on ``model`` (fp32 masters starting at θ0) and record the probe.

    ``grad_fn(model, step)`` produces the gradients of step ``step`` (0-based): it calls ``backward()`` on the
    user's loss, or returns a dict name -> gradient tensor. The learning rates are the plan's first ``steps``.
    With ``restore`` the model's weights are put back to θ0 afterwards."""
    if not isinstance(plan, Plan):
        raise UsageError(f"expected a Plan, got {type(plan).__name__}")
    from rlsubnet import limits

    steps = limits.integer(steps, "probe steps", 2, plan.total_steps)
    params = unique_named_parameters(model)
    if not params:
        raise ProbeError("the model has no trainable parameters to probe")
    bad = [n for n, p in params.items() if p.dtype != torch.float32]
    if bad:
        raise ProbeError(f"tensor {bad[0]!r} is {params[bad[0]].dtype}: a probe trains fp32 master weights")
    start = {n: p.detach().clone() for n, p in params.items()}
    recorder = GradientRecorder(params)
    optimizer = recorder.attach(plan_optimizer(plan, params))
    lrs = plan.lrs()
    try:
        for t in range(steps):
            for g in optimizer.param_groups:
                g["lr"] = float(lrs[t])
            optimizer.zero_grad(set_to_none=True)
            given = grad_fn(model, t)
            if isinstance(given, Mapping):
                for name, grad in given.items():
                    if name not in params:
                        raise ProbeError(f"the probe's gradient names tensor {name!r}, which the model does not train")
                    params[name].grad = grad.detach().to(params[name].dtype).reshape(params[name].shape)
            optimizer.step()
        stats = recorder.stats(steps, initial_hash=initial_hash(start), run_id=run_id, source={"kind": "callable"})
    finally:
        recorder.detach()
        if restore:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n])
    return stats.check()
