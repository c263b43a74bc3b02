"""Errors for patches. All are :class:`~rlsubnet.errors.RlsubnetError`: the CLI prints one line, exits 2."""

from rlsubnet.errors import RlsubnetError


class PatchError(RlsubnetError):
    """A patch file cannot be read or trusted: truncated, tampered, not a patch, or a format we cannot read."""


class PatchVersionError(PatchError):
    """The patch was written in a newer format version than this rlsubnet reads."""


class WrongBaseError(RlsubnetError):
    """The checkpoint or model a patch is applied to is not the base it was made from (or a chain is out of order)."""
