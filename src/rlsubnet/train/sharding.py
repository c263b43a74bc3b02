"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): the local tensor of a DTensor and where
it sits in the full tensor, so a mask over the full tensor can be cut to the rank's own shard.

``fully_shard`` splits dim 0 like ``torch.chunk``: with n rows over W ranks each rank gets ceil(n / W) rows, the
last ones fewer or none (its storage is padded, but the local tensor is not). A row-major tensor's rows
[r0, r1) are its flat entries [r0·row, r1·row), so the rank's part of a flat mask is one contiguous slice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeGuard

import torch

from rlsubnet.errors import UsageError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without the distributed package
        return None
    return DTensor


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: the local shard of a DTensor (a view: writes reach the parameter), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _shard_dims(p: DTensor, name: str) -> list[int]:
    """Mesh dimensions that split ``p``'s dim 0; any other placement is refused (``fully_shard`` makes none)."""
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for mesh_dim, pl in enumerate(p.placements):
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and pl.dim == 0:
            dims.append(mesh_dim)
            continue
        raise UsageError(
            f"{name}: DTensor placement {pl} is not supported by the masked optimizers (only Shard(0) and "
            "Replicate, as torch.distributed.fsdp.fully_shard makes)"
        )
    return dims


def local_range(p: torch.Tensor, name: str) -> tuple[int, int]:
    """Flat entries [start, stop) of the full tensor that this rank holds (all of them for a plain tensor)."""
    if not is_dtensor(p):
        return 0, p.numel()
    shape = tuple(p.shape)
    if not shape:
        return 0, 1  # a 0-dim DTensor can only be replicated: _shard_dims refuses anything else
    dims = _shard_dims(p, name)
    row = math.prod(shape[1:])
    start, length = 0, shape[0]
    coord = p.device_mesh.get_coordinate()
    if coord is None:  # this rank is outside the mesh
        if dims:
            raise UsageError(f"{name}: this rank is not in the DTensor's device mesh, so it holds no shard of it")
        coord = ()
    for d in dims:
        # nested Shard(0) placements split the current slice again, in mesh-dimension order
        world, c = p.device_mesh.size(d), coord[d]
        chunk = -(-length // world)
        lo = min(c * chunk, length)
        hi = min(lo + chunk, length)
        start, length = start + lo, hi - lo
    got = tuple(p.to_local().shape)
    if got != (length, *shape[1:]):
        raise UsageError(
            f"{name}: the local shard has shape {list(got)}, but splitting {list(shape)} over the mesh gives "
            f"{[length, *shape[1:]]}: an uneven sharding the masked optimizers do not know"
        )
    return start * row, (start + length) * row


def reduce_groups(p: torch.Tensor, name: str) -> tuple:
    """Process groups over which a sum of this rank's entries must be summed to cover the whole tensor."""
    if not is_dtensor(p):
        return ()
    return tuple(p.device_mesh.get_group(d) for d in _shard_dims(p, name))


def shard_like(full: torch.Tensor, p: torch.Tensor, name: str) -> torch.Tensor:
    """``full`` (a plain tensor of ``p``'s full shape) cut to this rank's shard, as a DTensor placed like ``p``."""
    if not is_dtensor(p):
        return full
    from torch.distributed.tensor import DTensor

    start, stop = local_range(p, name)
    part = full.reshape(-1)[start:stop].reshape(p.to_local().shape)
    return DTensor.from_local(part, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
