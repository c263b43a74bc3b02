"""Content hashes recorded in masks are compared only under the scheme they were recorded with."""

from __future__ import annotations

import warnings

from rlsubnet.checkpoint.hashing import HASH_SCHEME
from rlsubnet.cli.train import warn_if_other_base
from rlsubnet.masks import build_mask


def test_train_warns_on_another_base_only_under_the_same_scheme(sharded_pair):
    base, tuned, _, _ = sharded_pair
    m = build_mask(base, tuned)
    assert m.meta["base"]["content_hash_scheme"] == HASH_SCHEME
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_other_base(m, base)  # the mask's own base: silent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_other_base(m, tuned)
    assert any("weights differ" in str(w.message) for w in caught)
    m.meta["base"] = dict(m.meta["base"], content_hash_scheme="sha256-tensors-v1", content_hash="ab" * 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_other_base(m, tuned)  # an older mask's SHA-256 hash: not comparable, no false alarm
