"""Errors that rlsubnet raises for bad input.

Every error names the file or tensor at fault. The CLI prints ``rlsubnet: error: <message>`` on one line and
exits with status 2; library users catch :class:`RlsubnetError`.
"""


def listing(items, show: int = 8) -> str:
    """The first ``show`` items, comma-separated, and how many more: for errors that list names."""
    items = [str(i) for i in items]
    return ", ".join(items[:show]) + (f" ... and {len(items) - show} more" if len(items) > show else "")


class RlsubnetError(Exception):
    """Base class: a problem with the user's input, reported in one line."""


class CheckpointError(RlsubnetError):
    """A checkpoint cannot be found, read or trusted (missing file, corrupt header, truncated data...)."""


class MismatchError(RlsubnetError):
    """Two checkpoints do not hold the same tensors (missing, extra or differently shaped)."""


class UsageError(RlsubnetError):
    """Options that do not make sense together, or values out of range."""


class OutputBusyError(RlsubnetError):
    """Another run is writing the same output (its lock is held)."""
