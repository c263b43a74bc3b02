"""Train a TRL / ``transformers`` Trainer (GRPO, DPO, SFT...) with the sparse optimizer: optimizer state for the
mask's entries only.

Build the trainer as for a full run, then attach the mask before ``train()``:

>>> trainer = GRPOTrainer(model=model, args=config, train_dataset=ds, reward_funcs=reward, processing_class=tok)
>>> cb = attach_sparse(trainer, "grpo.mask.safetensors")
>>> trainer.train(); cb.last_report["state_bytes"]

The sparse optimizer takes the hyper-parameters of the optimizer the trainer already holds (a torch AdamW, Adam
or SGD passed as ``optimizers=(opt, None)``: its learning rate, betas, eps and each group's weight decay) or,
when it holds none, those of ``args`` (transformers' AdamW: no decay on biases and norms). Or build it yourself
with :func:`sparse_optimizer_for` and pass it as ``optimizers=(opt, None)``, then ``attach_sparse(trainer, opt)``.

**Clipping moves into the optimizer.** Backward leaves no dense gradient on the parameters (each is reduced to its
trainable entries as soon as it is complete), so the trainer's own clipping would see none: ``attach_sparse``
sets ``args.max_grad_norm`` to 0 and the optimizer clips at the trainer's value, by the norm of the full gradient
summed over the accumulated micro-batches (``accumulation_steps`` = ``args.gradient_accumulation_steps``); the
trainer logs that norm as ``grad_norm``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from rlsubnet.errors import UsageError
from rlsubnet.errors import listing as _listing
from rlsubnet.masks.mask import MaskError
from rlsubnet.train.masking import unwrap_model, unwrap_optimizer
from rlsubnet.train.sparse_optim import SparseMaskedOptimizer
from rlsubnet.train.sparse_rules import SUPPORTED, optimizer_kind

logger = logging.getLogger(__name__)

# the hyper-parameters every group of a torch optimizer must share to become one sparse optimizer
_SHARED = ("lr", "betas", "eps", "momentum", "dampening", "nesterov", "maximize", "decoupled_weight_decay")
# TrainingArguments.optim values that are torch's AdamW / SGD
_ARGS_OPTIM = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "sgd": "sgd"}


def _from_torch_optimizer(model, like: torch.optim.Optimizer) -> dict:
    """The sparse optimizer's keyword arguments that reproduce ``like`` (AdamW, Adam or SGD)."""
    kind = optimizer_kind(type(like))
    groups = like.param_groups
    if any(g.get("amsgrad") for g in groups):
        raise UsageError(f"amsgrad is not supported with sparse optimizer state (supported: {', '.join(SUPPORTED)})")
    first = groups[0]
    differ = sorted({k for g in groups[1:] for k in _SHARED if k in first and g.get(k) != first[k]})
    decays = sorted({float(g["weight_decay"]) for g in groups})
    if differ or len(decays) > 2 or (len(decays) == 2 and decays[0] != 0.0):
        what = ", ".join(differ) if differ else f"weight decays {decays}"
        raise UsageError(
            f"the trainer's {type(like).__name__} has parameter groups that differ in {what}: the sparse optimizer "
            "takes one set of hyper-parameters, with weight decay 0 allowed for a second group"
        )
    held = {id(p): float(g["weight_decay"]) for g in groups for p in g["params"]}
    missing = [n for n, p in unwrap_model(model).named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise UsageError(
            f"the trainer's optimizer does not hold {len(missing)} trainable parameters ({_listing(missing)})"
        )
    kw: dict[str, Any] = {
        k: first[k] for k in ("lr", "betas", "eps", "momentum", "dampening", "nesterov", "maximize") if k in first
    }
    if kind == "adam":
        kw["decoupled_weight_decay"] = bool(first.get("decoupled_weight_decay", False))
    kw["weight_decay"] = decays[-1]
    if len(decays) == 2:
        kw["no_decay"] = lambda name, p: held.get(id(p)) == 0.0
    kw["optimizer"] = kind
    return kw


def _from_args(model, args, decay_names) -> dict:
    kind = _ARGS_OPTIM.get(str(getattr(args.optim, "value", args.optim)))
    if kind is None:
        raise UsageError(
            f"optim={args.optim!r} in the training arguments is not supported with sparse optimizer state "
            f"(supported: {', '.join(SUPPORTED)}: adamw_torch, adamw_torch_fused, sgd)"
        )
    kw: dict = {"optimizer": kind, "lr": args.learning_rate, "weight_decay": args.weight_decay}
    if kind == "adamw":
        kw.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if decay_names is not None:
        decay = {id(p) for n, p in unwrap_model(model).named_parameters() if n in set(decay_names)}
        kw["no_decay"] = lambda name, p: id(p) not in decay
    else:
        kw["no_decay"] = lambda name, p: p.ndim < 2
    return kw


def sparse_optimizer_for(model, args, mask, *, like=None, decay_names=None, **options) -> SparseMaskedOptimizer:
    """A :class:`SparseMaskedOptimizer` for training ``model`` on ``mask`` under TrainingArguments ``args``.

    Hyper-parameters come from the torch optimizer ``like`` (AdamW, Adam or SGD) when given, else from ``args``
    (AdamW; ``decay_names``: the parameters that get weight decay, default every tensor of 2 or more dimensions).
    Clipping at ``args.max_grad_norm`` by the full gradient's norm, ``accumulation_steps`` =
    ``args.gradient_accumulation_steps``. ``options``: the optimizer's other keywords (``mask_before_clip``,
    ``compare_mode``, ``allow_full``, ``reduce_grads``).
    """
    kw = _from_torch_optimizer(model, like) if like is not None else _from_args(model, args, decay_names)
    clip = float(args.max_grad_norm or 0.0)
    kw.update(max_grad_norm=clip if clip > 0 else None, accumulation_steps=int(args.gradient_accumulation_steps))
    kw.update(options)
    return SparseMaskedOptimizer(unwrap_model(model), mask, **kw)


def attach_sparse(trainer, mask, **options) -> SparseTrainingCallback:
    """Make ``trainer`` train only ``mask``'s entries with sparse optimizer state; returns the callback (its
    ``optimizer``, and ``last_report`` after training). Call before ``train()``.

    ``mask``: a mask (object or file), or a :class:`SparseMaskedOptimizer` already passed to the trainer as
    ``optimizers=(opt, None)``. ``options``: as for :func:`sparse_optimizer_for`.
    """
    if any(isinstance(cb, SparseTrainingCallback) for cb in trainer.callback_handler.callbacks):
        raise MaskError("this trainer already trains with a sparse optimizer")
    current = trainer.optimizer
    if current is not None and type(current).__name__ == "AcceleratedOptimizer":
        raise UsageError("attach the sparse optimizer before trainer.train(): the trainer has prepared its optimizer")
    args = trainer.args
    clip = float(args.max_grad_norm or 0.0)
    if isinstance(mask, SparseMaskedOptimizer):
        if options:
            raise UsageError(
                f"attach_sparse options ({', '.join(sorted(options))}) apply when it builds the optimizer from a "
                "mask; this optimizer is already built"
            )
        opt = mask
        if current is not None and current is not opt:
            raise UsageError("the trainer holds another optimizer: pass this one as optimizers=(opt, None)")
        if clip > 0 and opt.max_grad_norm != clip:
            raise UsageError(
                f"the trainer clips at max_grad_norm={clip:g} but the sparse optimizer at {opt.max_grad_norm}: "
                "the optimizer must clip (the parameters hold no gradient when the trainer would); build it with "
                f"max_grad_norm={clip:g}, or set max_grad_norm=0 in the training arguments"
            )
        steps = int(args.gradient_accumulation_steps)
        if opt._dense_norm and opt.accumulation_steps != steps:
            raise UsageError(
                f"gradient_accumulation_steps={steps} but the sparse optimizer was built with accumulation_steps="
                f"{opt.accumulation_steps}: the full-gradient norm needs the same count"
            )
    else:
        like = unwrap_optimizer(current) if current is not None else None
        decay = trainer.get_decay_parameter_names(trainer.model) if like is None else None
        opt = sparse_optimizer_for(trainer.model, args, mask, like=like, decay_names=decay, **options)
    trainer.optimizer = opt
    args.max_grad_norm = 0.0  # the optimizer clips; the trainer must not (it would see no gradient)
    cb = SparseTrainingCallback(opt)

    @functools.wraps(trainer._get_grad_norm)
    def _get_grad_norm(model, grad_norm=None):
        return cb.optimizer.grad_norm()

    trainer._get_grad_norm = _get_grad_norm
    trainer.add_callback(cb)
    return cb


class SparseTrainingCallback(TrainerCallback):
    """Checks that every optimizer step of the trainer is the sparse optimizer's, and keeps its report."""

    def __init__(self, optimizer: SparseMaskedOptimizer):
        self.optimizer = optimizer
        self.last_report: dict | None = None
        self._steps_before: int | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or unwrap_optimizer(optimizer) is not self.optimizer:
            raise MaskError("the trainer's optimizer is not the sparse optimizer that was attached")
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise MaskError("the trainer's max_grad_norm was set again after the sparse optimizer took over clipping")
        r = self.optimizer.report()
        logger.info(
            "rlsubnet: training %s of %s entries (density %.4f) with sparse optimizer state (%s bytes); %s",
            f"{r['trainable']:,}",
            f"{r['numel']:,}",
            r["density"],
            f"{r['state_bytes']:,}",
            r["order"],
        )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and unwrap_optimizer(optimizer) is not self.optimizer:
            raise MaskError("the trainer's optimizer was replaced after the sparse optimizer was attached")
        self._steps_before = self.optimizer.steps

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._steps_before is None:
            return
        if self.optimizer.steps != self._steps_before + 1 and not getattr(optimizer, "step_was_skipped", False):
            raise MaskError("an optimizer step ran that was not the sparse optimizer's")
        self._steps_before = None

    def on_train_end(self, args, state, control, **kwargs):
        self.last_report = self.optimizer.report()


__all__ = ["SparseTrainingCallback", "attach_sparse", "sparse_optimizer_for"]
