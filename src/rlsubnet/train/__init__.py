"""Mask-restricted training: a masked optimizer step and its plug-in for TRL / transformers trainers.

``MaskedOptimizer`` needs only torch; ``attach_mask`` / ``SubnetworkCallback`` need transformers (the ``train``
extra) and are imported on first use.
"""

from rlsubnet.train.masking import (
    FullMaskWarning,
    MaskDtypeWarning,
    MaskedOptimizer,
    MaskModeWarning,
    mask_optimizer,
    resolve_parameter_masks,
)
from rlsubnet.train.verify import check_frozen_masters, frozen_changes, frozen_snapshot


def __getattr__(name):
    if name in ("attach_mask", "MaskedTrainerMixin", "masked_trainer_class"):
        from rlsubnet.train import trainers

        return getattr(trainers, name)
    if name in ("SparseMaskedOptimizer", "sparse_optimizer"):
        from rlsubnet.train import sparse_optim

        return getattr(sparse_optim, name)
    if name in ("attach_sparse", "sparse_optimizer_for", "SparseTrainingCallback"):
        from rlsubnet.train import sparse_trainers

        return getattr(sparse_trainers, name)
    if name == "SubnetworkCallback":
        from rlsubnet.train.callbacks import SubnetworkCallback

        return SubnetworkCallback
    raise AttributeError(f"module 'rlsubnet.train' has no attribute {name!r}")


__all__ = [
    "check_frozen_masters",
    "FullMaskWarning",
    "MaskDtypeWarning",
    "MaskModeWarning",
    "MaskedOptimizer",
    "MaskedTrainerMixin",
    "SparseMaskedOptimizer",
    "SparseTrainingCallback",
    "SubnetworkCallback",
    "attach_mask",
    "attach_sparse",
    "frozen_changes",
    "frozen_snapshot",
    "mask_optimizer",
    "masked_trainer_class",
    "resolve_parameter_masks",
    "sparse_optimizer",
    "sparse_optimizer_for",
]
