"""After a masked run: check, bit for bit, that the fp32 master weights outside the mask are still θ0's values.

Used by ``rlsubnet train --mask`` (``OUT/mask.json``) and by the demo's subnetwork re-runs. Needs only torch and
the checkpoint readers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rlsubnet._bits import int_view
from rlsubnet.masks.mask import Mask
from rlsubnet.train.masking import unwrap_model


def check_frozen_masters(mask, base, master) -> dict:
    """Count the entries outside ``mask`` whose fp32 master differs (bitwise) from θ0's value upcast to fp32.

    ``base`` is θ0 (a bf16 checkpoint: the masters start at its values exactly) and ``master`` the fp32 master
    weights written after training; both are anything :func:`rlsubnet.open_checkpoint` opens. Tensors of the
    master file that the mask does not cover are not checked; a mask tensor missing from the master file is an
    error (it could not be checked). Returns ``{"frozen_entries_checked",
    "frozen_entries_moved", "moved_by_tensor", "trainable_entries", "trainable_entries_moved"}`` (the last two
    count the mask's own entries, and how many of them differ from θ0 in fp32).
    """
    import torch

    from rlsubnet.checkpoint import open_checkpoint
    from rlsubnet.errors import MismatchError
    from rlsubnet.errors import listing as _listing

    base_ck = open_checkpoint(base, label="base")
    master_ck = open_checkpoint(master, label="master")
    checked = moved = trainable = trainable_moved = 0
    per_tensor = {}
    try:
        for name in master_ck.names():
            if name not in mask:
                continue
            if name not in base_ck.infos:
                raise MismatchError(f"{master}: tensor {name!r} is not in the base {base}")
            b = base_ck.read(name).to(torch.float32)
            m = master_ck.read(name).to(torch.float32)
            if b.shape != m.shape:
                raise MismatchError(f"{master}: tensor {name!r} has shape {list(m.shape)}, the base {list(b.shape)}")
            trains = mask.tensor(name)
            differs = b.view(torch.int32) != m.view(torch.int32)
            n_moved = int((differs & ~trains).sum())
            n_trains = int(trains.sum())
            checked += b.numel() - n_trains
            moved += n_moved
            trainable += n_trains
            trainable_moved += int((differs & trains).sum())
            if n_moved:
                per_tensor[name] = n_moved
        # A mask tensor the master file lacks would otherwise go unchecked and read as "0 moved".
        unchecked = [n for n in mask.names() if n not in master_ck.infos]
        if unchecked:
            raise MismatchError(
                f"{master}: holds no tensor {_listing(unchecked)} of the mask ({len(unchecked)} unchecked): "
                "is this the master file of the masked run?"
            )
    finally:
        if base_ck is not base:
            base_ck.close()
        if master_ck is not master:
            master_ck.close()
    return {
        "frozen_entries_checked": checked,
        "frozen_entries_moved": moved,
        "moved_by_tensor": per_tensor,
        "trainable_entries": trainable,
        "trainable_entries_moved": trainable_moved,
    }


def frozen_snapshot(model: torch.nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    """Copies of every masked model parameter (for tests and checks: compare with :func:`frozen_changes`)."""
    model = unwrap_model(model)
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in mask.names() if n in params}


def frozen_changes(
    model: torch.nn.Module, mask: Mask, before: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Per parameter: (frozen entries whose bits changed, trainable entries whose bits changed) since ``before``."""
    model = unwrap_model(model)
    params = dict(model.named_parameters())
    out = {}
    for n, old in before.items():
        now = params[n].detach()
        diff = int_view(now) != int_view(old)
        trainable = mask.tensor(n, device=now.device)
        out[n] = (int((diff & ~trainable).sum()), int((diff & trainable).sum()))
    return out
