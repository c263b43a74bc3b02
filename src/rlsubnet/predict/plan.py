"""A training plan: what the predictors know about the run before it starts.

The optimizer and its settings, the learning-rate schedule over the run's steps, and how the result will be
judged (the storage dtype of the compared checkpoints, the comparison mode and atol of the changed-test).
Schedules follow Hugging Face's ``get_*_schedule_with_warmup`` (the trainers' own): optimizer step t (from 0)
uses lr · λ(t), and a warmup starts at 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.predict.choices import OPTIMIZERS, SCHEDULES, STORAGE_DTYPES

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Plan:
    """The run a prediction is for. Weight decay applies to tensors of two or more dimensions only (norms and
    biases are not decayed: the Hugging Face Trainer's grouping, and the lab's)."""

    steps: int | None = None
    lr: float = 1e-6
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    storage_dtype: str = "bf16"
    atol: float = 1e-5
    mode: str = "bf16"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown --optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UsageError(
                f"unknown --storage-dtype {self.storage_dtype!r} (choose from {', '.join(STORAGE_DTYPES)})"
            )
        if self.steps is None:
            raise UsageError(
                f"the plan needs --steps: the {self.schedule} schedule and the update budget are defined over "
                "the run's optimizer steps"
            )
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("steps", limits.integer(self.steps, "--steps", 1, limits.MAX_STEPS))
        set_("warmup", limits.integer(self.warmup, "--warmup", 0, limits.MAX_STEPS))
        if self.warmup > self.steps:
            raise UsageError(f"--warmup {self.warmup} is longer than the run (--steps {self.steps})")
        set_("lr", limits.real(self.lr, "--lr", lo_open=True))
        if len(tuple(self.betas)) != 2:
            raise UsageError(f"--betas takes two numbers, got {list(self.betas)}")
        b1, b2 = (limits.real(b, "--betas", 0.0, 1.0) for b in self.betas)
        if b1 >= 1 or b2 >= 1:
            raise UsageError(f"--betas must each be below 1, got {b1:g} {b2:g}")
        set_("betas", (b1, b2))
        set_("eps", limits.real(self.eps, "--eps"))
        set_("weight_decay", limits.real(self.weight_decay, "--weight-decay"))
        set_("momentum", limits.real(self.momentum, "--momentum", 0.0, 1.0))
        if self.momentum >= 1:
            raise UsageError(f"--momentum must be below 1, got {self.momentum:g}")
        if self.momentum and self.optimizer != "sgd":
            raise UsageError(f"--momentum is SGD's; {self.optimizer} takes --betas")
        set_("atol", limits.atol(self.atol, "--atol"))
        limits.mode(self.mode, "--mode")

    # -- the schedule
    @property
    def total_steps(self) -> int:
        """``steps``, known to be set (checked on construction)."""
        if self.steps is None:  # unreachable: __post_init__ refuses it
            raise UsageError("the plan needs --steps")
        return self.steps

    def lrs(self) -> np.ndarray:
        """The learning rate of every optimizer step, float64, length ``steps``."""
        t = np.arange(self.total_steps, dtype=np.float64)
        w, n = float(self.warmup), float(self.total_steps)
        warm = t / max(1.0, w)
        if self.schedule == "constant":
            after = np.ones_like(t)
        else:
            progress = (t - w) / max(1.0, n - w)
            if self.schedule == "linear":
                after = np.maximum(0.0, (n - t) / max(1.0, n - w))
            else:
                after = np.maximum(0.0, 0.5 * (1.0 + np.cos(math.pi * progress)))
        return self.lr * np.where(t < w, warm, after)

    def budget(self, start: int = 0) -> tuple[float, float]:
        """(Σ lr_t, √Σ lr_t²) over steps ``start``..T−1: how far a steady and a random-walk unit step reach."""
        lrs = self.lrs()[start:]
        return float(lrs.sum()), float(math.sqrt(float((lrs * lrs).sum())))

    def decay_factor(self, start: int = 0) -> float:
        """Π (1 − lr_t·wd) over steps ``start``..T−1: what decoupled weight decay leaves of a weight (AdamW)."""
        if not self.weight_decay:
            return 1.0
        return float(np.prod(1.0 - self.lrs()[start:] * self.weight_decay))

    @property
    def storage(self) -> torch.dtype:
        return _TORCH_DTYPES[self.storage_dtype]

    # -- records
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(d) - known)
            if unknown:
                raise UsageError(f"unknown plan field {unknown[0]!r}")
            return cls(**{**d, "betas": tuple(d.get("betas", (0.9, 0.999)))})
        except TypeError as exc:
            raise UsageError(f"not a plan: {exc}") from None

    def describe(self) -> str:
        opt = f"{self.optimizer} lr {self.lr:g}"
        if self.optimizer == "sgd":
            opt += f" momentum {self.momentum:g}"
        else:
            opt += f" betas {self.betas[0]:g}/{self.betas[1]:g} eps {self.eps:g}"
        if self.weight_decay:
            opt += f" wd {self.weight_decay:g}"
        sched = self.schedule + (f" (warmup {self.warmup})" if self.warmup else "")
        return f"{opt}, {sched}, {self.steps} steps; {self.storage_dtype} storage, atol {self.atol:g} ({self.mode})"


def plan_of_stage(spec, *, atol: float = 1e-5, mode: str = "bf16") -> Plan:
    """The plan of a lab stage (:class:`rlsubnet.lab.config.StageSpec`): the settings its trainer is built with
    (:func:`rlsubnet.lab.trainers.common_args`, its optimizer: AdamW or plain SGD), bf16 checkpoints."""
    from rlsubnet.lab.trainers import common_args

    args = common_args(
        ".",
        learning_rate=spec.learning_rate,
        steps=spec.steps,
        seed=spec.seed,
        max_grad_norm=spec.max_grad_norm,
        weight_decay=spec.weight_decay,
    )
    schedule = args["lr_scheduler_type"]
    if schedule not in SCHEDULES:
        raise UsageError(f"stage {spec.name}: schedule {schedule!r} has no plan (choose from {', '.join(SCHEDULES)})")
    if spec.optimizer == "sgd":  # the lab's plain SGD (rlsubnet.lab.trainers.sgd_optimizer): no momentum
        optimizer: dict = {"optimizer": "sgd", "momentum": 0.0}
    else:
        optimizer = {
            "optimizer": "adamw",
            "betas": (args["adam_beta1"], args["adam_beta2"]),
            "eps": args["adam_epsilon"],
        }
    return Plan(
        steps=spec.steps,
        lr=spec.learning_rate,
        **optimizer,
        weight_decay=args["weight_decay"],
        schedule=schedule,
        warmup=args["warmup_steps"],
        storage_dtype="bf16",
        atol=atol,
        mode=mode,
    )
