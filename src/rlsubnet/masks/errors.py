"""Errors about masks."""

from rlsubnet.errors import MismatchError, RlsubnetError


class MaskError(RlsubnetError):
    """A mask file cannot be read or trusted, or a mask cannot be used as asked."""


class MaskMismatchError(MaskError, MismatchError):
    """Two masks, or a mask and a model, cover different tensors or shapes."""
