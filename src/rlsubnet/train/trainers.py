"""Plug a mask into TRL's SFTTrainer, DPOTrainer and GRPOTrainer (or any ``transformers.Trainer``).

Build the trainer exactly as for the full run (same model, data, config, seed), then attach the mask before
``train()``; the mask draws no random numbers and changes no argument, so the data order and every random draw
are those of the full run:

>>> trainer = GRPOTrainer(model=model, args=config, train_dataset=ds, reward_funcs=reward, processing_class=tok)
>>> cb = attach_mask(trainer, "grpo-full.mask.safetensors")      # or a Mask object
>>> trainer.train(); cb.last_report["restored_entries"]

or use a masked subclass: ``masked_trainer_class(GRPOTrainer)(..., mask=m)``.
"""

from __future__ import annotations

import functools

from rlsubnet.masks.mask import MaskError
from rlsubnet.train.callbacks import SubnetworkCallback


def attach_mask(trainer, mask, **options) -> SubnetworkCallback:
    """Restrict ``trainer``'s optimizer to ``mask`` from its first step; returns the callback (see its report).

    Options are those of :class:`rlsubnet.train.MaskedOptimizer`: ``strict``, ``mask_before_clip``,
    ``compare_mode``, ``allow_full``, ``allow_empty``, ``verify_steps``. With ``mask_before_clip=True`` the
    gradient is masked before the trainer clips it (the clipping norm then only sees the subnetwork).
    """
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, SubnetworkCallback):
            raise MaskError("this trainer already has a mask attached")
    cb = SubnetworkCallback(mask, **options)
    if cb.mask_before_clip:
        clip = getattr(trainer, "_clip_grad_norm", None)
        if clip is None:
            raise MaskError(
                f"{type(trainer).__name__} has no _clip_grad_norm to wrap: mask_before_clip is not supported"
            )

        @functools.wraps(clip)
        def _clip_grad_norm(model, _clip=clip):
            if cb.masked is None:
                raise MaskError("gradient clipping ran before the mask was attached")
            cb.masked.mask_gradients()
            return _clip(model)

        trainer._clip_grad_norm = _clip_grad_norm
        cb.clip_wired = True
    trainer.add_callback(cb)
    return cb


class MaskedTrainerMixin:
    """Adds ``mask=`` (and ``mask_options=``) to a trainer's constructor; ``self.mask_callback`` holds the callback."""

    def __init__(self, *args, mask=None, mask_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if mask is None:
            raise MaskError(f"{type(self).__name__} needs mask=")
        self.mask_callback = attach_mask(self, mask, **(mask_options or {}))


@functools.cache
def masked_trainer_class(trainer_cls: type) -> type:
    """``masked_trainer_class(GRPOTrainer)`` -> a subclass whose constructor takes ``mask=``."""
    return type(f"Masked{trainer_cls.__name__}", (MaskedTrainerMixin, trainer_cls), {})
