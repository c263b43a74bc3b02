"""The shared helpers: the layout-mismatch wording, tied weights listed once, groups in table order, a mask's record."""

from __future__ import annotations

import numpy as np
import torch

import rlsubnet
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.tensors import tied_groups, unique_tensors
from rlsubnet.diff.names import grouped, table_order
from rlsubnet.masks import Mask
from rlsubnet.patch import model_tensors


def test_layout_diff_names_each_kind_once_in_the_first_sides_order():
    first = {"a": (2,), "b": (3,), "c": (4,), "d": (5,)}
    second = {"d": (5, 1), "b": (3,), "e": (1,), "c": (4,)}
    diff = layout_diff(first, second)
    assert (diff.missing, diff.extra, diff.differ) == (["a"], ["e"], ["d"])
    assert diff.describe("missing from B", "only in B") == (
        "1 missing from B: a; 1 only in B: e; 1 with different shapes: d (5,) vs (5, 1)"
    )
    same = layout_diff(first, dict(first))
    assert not same and same.describe("x", "y") == ""
    only_extra = layout_diff({}, {"z": (1,)}, detail=lambda n, a, b: "unused")
    assert only_extra.describe("gone", "new", "moved") == "1 new: z"


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight  # tied, as Hugging Face ties lm_head to the embedding
        self.register_buffer("empty_a", torch.empty(0))
        self.register_buffer("empty_b", torch.empty(0))


def test_tied_weights_are_listed_once_under_their_first_name():
    model = Tied()
    names = list(unique_tensors(model))
    assert names == ["empty_a", "empty_b", "embed.weight", "body.weight", "body.bias"]  # empty tensors never tie
    assert list(model_tensors(model)) == names
    with rlsubnet.open_checkpoint(model) as ck:
        assert ck.names() == names
    groups = tied_groups(model.named_parameters(remove_duplicate=False), key=id)
    assert groups == {"embed.weight": ["embed.weight", "head.weight"], "body.weight": ["body.weight"],
                      "body.bias": ["body.bias"]}


def test_groups_come_in_table_order():
    names = ["lm_head.weight", "model.layers.10.mlp.up_proj.weight", "model.embed_tokens.weight",
             "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    from rlsubnet.diff.names import layer_of, module_kind

    layers = grouped(names, layer_of, "layer")
    assert [k for k, _ in layers] == [2, 10, None]
    assert layers[0][1] == ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    assert [k for k, _ in grouped(names, module_kind, "module")] == ["q", "up", "embed", "lm_head", "norm"]
    assert table_order(["zz", "norm", "q"], "module") == ["q", "norm", "zz"]


def test_a_mask_is_described_by_the_keys_asked_for_in_their_order():
    m = Mask.from_bool({"w": np.array([True, False, True, False])},
                       {"kind": "changed", "atol": 1e-5, "dtype": "bf16", "base": {"source": "b/"}})
    assert m.describe(("dtype", "kind", "density", "base", "tuned")) == {
        "dtype": "bf16", "kind": "changed", "density": 0.5, "base": "b/", "tuned": None}
    full = m.describe()
    assert list(full) == ["kind", "path", "atol", "dtype", "density", "changed", "bits_sha256", "base", "tuned"]
    assert full["bits_sha256"] == m.bits_sha256() and m.mode == "bf16"
