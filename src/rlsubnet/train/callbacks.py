"""A ``transformers`` callback that restricts a Trainer's optimizer (any TRL trainer's) to a mask.

The callback attaches :class:`~rlsubnet.train.masking.MaskedOptimizer` to the trainer's optimizer in
``on_train_begin``: after the optimizer and scheduler exist, after ``accelerate`` has prepared them and after a
checkpoint resume has loaded their state. From then on every ``optimizer.step()`` is masked. The trainer clips
gradients before it calls ``optimizer.step()``, so the default order is the paper's: clip the full gradient,
then mask (``on_pre_optimizer_step`` runs at the same point). Each step is checked: the optimizer about to step
must be the masked one, and the mask must have run; anything else is an error, never a silently unmasked step.

Use :func:`rlsubnet.train.attach_mask` rather than this class directly: it also wires ``mask_before_clip``.
"""

from __future__ import annotations

import inspect
import logging

from transformers import TrainerCallback

from rlsubnet.masks.mask import MaskError, as_mask
from rlsubnet.train.masking import MaskedOptimizer, unwrap_optimizer

# MaskedOptimizer's options (and the old name of one), checked when the callback is made, not at the first step
OPTIONS = {n for n, p in inspect.signature(MaskedOptimizer).parameters.items() if p.kind == p.KEYWORD_ONLY}
OPTIONS |= {"compare_dtype"}

logger = logging.getLogger(__name__)


class SubnetworkCallback(TrainerCallback):
    """Mask the trainer's optimizer from the first step on; ``options`` as for :class:`MaskedOptimizer`
    (``strict``, ``mask_before_clip``, ``compare_mode``, ``allow_full``, ``allow_empty``, ``verify_steps``)."""

    def __init__(self, mask, **options):
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (options: {', '.join(sorted(OPTIONS))})")
        self.mask = as_mask(mask)  # load (and verify) now: a bad mask fails before any training
        self.mask_before_clip = bool(options.get("mask_before_clip", False))
        self.options = options
        self.masked: MaskedOptimizer | None = None
        self.clip_wired = False
        self.last_report: dict | None = None
        self._steps_before: int | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None or model is None:
            raise MaskError("the trainer gave the mask callback no optimizer or model at on_train_begin")
        if self.mask_before_clip and not self.clip_wired:
            raise MaskError(
                "mask_before_clip needs the trainer's clipping wired: use rlsubnet.train.attach_mask(trainer, ...)"
            )
        opt = unwrap_optimizer(optimizer)
        if self.masked is not None:
            if self.masked.attached and self.masked.optimizer is opt:
                return
            self.masked.remove()
        self.masked = MaskedOptimizer(opt, self.mask, model, **self.options)
        r = self.masked.report()
        logger.info(
            "rlsubnet: training %s of %s entries (density %.4f) of the mask %s; %s; %s",
            f"{r['trainable']:,}",
            f"{r['numel']:,}",
            r["density"],
            r["mask"]["path"] or r["mask"]["kind"],
            r["order"],
            r["mode"],
        )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        m = self.masked
        if m is None or not m.attached:
            raise MaskError("an optimizer step is about to run but the mask is not attached")
        if optimizer is not None and unwrap_optimizer(optimizer) is not m.optimizer:
            raise MaskError(
                "the trainer's optimizer was replaced after the mask was attached: this step would be unmasked"
            )
        self._steps_before = m.steps

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        m = self.masked
        if m is None or self._steps_before is None:
            return
        if m.steps != self._steps_before + 1 and not getattr(optimizer, "step_was_skipped", False):
            raise MaskError("optimizer.step() ran without the mask hooks: the step was not masked")
        self._steps_before = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.masked is not None:
            self.last_report = self.masked.report()
            self.masked.remove()
            self.masked = None
