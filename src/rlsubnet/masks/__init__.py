"""Subnetwork masks: the bit-packed artifact, building one from a checkpoint pair, combining, random baselines
and overlap against chance. See docs/masks-and-training.md.

>>> from rlsubnet.masks import build_mask, Mask, random_mask, overlap
>>> m = build_mask("base/", "grpo/", atol=1e-5); m.save("grpo.mask.safetensors")
>>> r = random_mask(m, scope="per_tensor", seed=0)
>>> overlap(m, Mask.load("dpo.mask.safetensors"), base="base/").o1
"""

from rlsubnet.masks.build import build_mask, build_masks, checkpoint_record, identity
from rlsubnet.masks.mask import Mask, MaskError, MaskMismatchError, as_mask, load_mask
from rlsubnet.masks.overlap import OverlapResult, PairOverlap, overlap, overlap_many
from rlsubnet.masks.random import random_mask

__all__ = [
    "Mask",
    "MaskError",
    "MaskMismatchError",
    "OverlapResult",
    "PairOverlap",
    "as_mask",
    "build_mask",
    "build_masks",
    "checkpoint_record",
    "identity",
    "load_mask",
    "overlap",
    "overlap_many",
    "random_mask",
]
