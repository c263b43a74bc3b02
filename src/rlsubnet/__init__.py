"""rlsubnet: measure, extract, train and ship the sparse subnetworks that RL finetuning updates.

Definitions follow *Reinforcement Learning Finetunes Small Subnetworks in Large Language Models*
(arXiv 2505.11711): density = ‖θ1 − θ0‖₀ / n, sparsity = 1 − density, an entry unchanged when
``torch.isclose(Δ, 0, atol=atol)`` on the bf16 Δ.
"""

from rlsubnet._version import __version__
from rlsubnet.errors import CheckpointError, MismatchError, RlsubnetError, UsageError


def __getattr__(name):
    # Heavy imports (torch) happen on first use, so `rlsubnet --help` stays instant.
    if name in ("compare", "compare_many"):
        from rlsubnet import engine as _compare_module

        return getattr(_compare_module, name)
    if name == "CompareResult":
        from rlsubnet.diff.summary import CompareResult

        return CompareResult
    if name == "open_checkpoint":
        from rlsubnet.checkpoint import open_checkpoint

        return open_checkpoint
    raise AttributeError(f"module 'rlsubnet' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CompareResult",
    "MismatchError",
    "RlsubnetError",
    "UsageError",
    "__version__",
    "compare",
    "compare_many",
    "open_checkpoint",
]
