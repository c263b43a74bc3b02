"""Sparse patches: ship only the entries RL changed, losslessly, verified by content hashes.

    create_patch(base, tuned, "p.rlpatch")           # positions of differing bits + their new values
    apply_patches(base, ["p.rlpatch"], "out/")       # rebuild the target bit for bit, in the base's layout
    apply_patch_(model, "p.rlpatch")                 # update a loaded model in place (live weight sync)
    generate_key("me.key"); create_patch(..., sign_key="me.key"); apply_patches(..., trusted_keys=["me.key.pub"])
    SparseSyncCallback(out_dir, every_steps=K, anchor_every=M)   # a transformers/TRL trainer callback

File format: :mod:`rlsubnet.patch.format`; bit-level coding: :mod:`rlsubnet.patch.codec`.
"""

from rlsubnet._lazy import lazy_getattr
from rlsubnet.patch.errors import PatchError, PatchVersionError, WrongBaseError

# name -> module it lives in: torch, numpy and transformers load on first use
_LAZY = {
    "create_patch": "rlsubnet.patch.encode",
    "write_patch": "rlsubnet.patch.encode",
    "PatchSummary": "rlsubnet.patch.encode",
    "apply_patches": "rlsubnet.patch.apply",
    "apply_patch_": "rlsubnet.patch.live",
    "model_tensors": "rlsubnet.patch.live",
    "ApplySummary": "rlsubnet.patch.apply",
    "PatchFile": "rlsubnet.patch.format",
    "patch_info": "rlsubnet.patch.info",
    "SparseSyncCallback": "rlsubnet.patch.sync",
    "SyncWriter": "rlsubnet.patch.sync",
    "sync_receive": "rlsubnet.patch.sync",
    "generate_key": "rlsubnet.patch.signing",
    "load_private_key": "rlsubnet.patch.signing",
    "load_public_key": "rlsubnet.patch.signing",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["PatchError", "PatchVersionError", "WrongBaseError", *_LAZY]
