"""rlsubnet: measure, extract, train and ship the sparse subnetworks that RL finetuning updates.

Definitions follow *Reinforcement Learning Finetunes Small Subnetworks in Large Language Models*
(arXiv 2505.11711): density = ‖θ1 − θ0‖₀ / n, sparsity = 1 − density, an entry unchanged when
``torch.isclose(Δ, 0, atol=atol)`` on the bf16 Δ.
"""

from rlsubnet._lazy import lazy_getattr
from rlsubnet._version import __version__
from rlsubnet.errors import CheckpointError, MismatchError, RlsubnetError, UsageError

# name -> module it lives in, imported on first use
_LAZY = {
    "compare": "rlsubnet.engine",
    "compare_many": "rlsubnet.engine",
    "CompareResult": "rlsubnet.diff.summary",
    "open_checkpoint": "rlsubnet.checkpoint",
    "Mask": "rlsubnet.masks",
    "build_mask": "rlsubnet.masks",
    "random_mask": "rlsubnet.masks",
    "overlap": "rlsubnet.masks",
    "identity": "rlsubnet.masks",
    "MaskedOptimizer": "rlsubnet.train",
    "attach_mask": "rlsubnet.train",
    "SparseMaskedOptimizer": "rlsubnet.train",
    "attach_sparse": "rlsubnet.train",
    "create_patch": "rlsubnet.patch",
    "apply_patches": "rlsubnet.patch",
    "apply_patch_": "rlsubnet.patch",
}
_lazy = lazy_getattr(__name__, _LAZY)


def __getattr__(name: str):
    # rlsubnet.predict is a package that can be called: rlsubnet.predict(base, plan) and rlsubnet.predict.Plan
    if name == "predict":
        import importlib

        return importlib.import_module("rlsubnet.predict")
    return _lazy(name)


__all__ = ["CheckpointError", "MismatchError", "RlsubnetError", "UsageError", "__version__", "predict", *_LAZY]
