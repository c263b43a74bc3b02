"""A comparison over zero parameters (no tensors, only empty tensors, or nothing in common) measures nothing:
every command refuses it in one line naming the checkpoints, instead of reporting 100% sparsity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rlsubnet
from rlsubnet.errors import RlsubnetError
from rlsubnet.masks import Mask, build_mask, identity, overlap_many, random_mask


@pytest.fixture
def empties(tmp_path):
    """name -> path: a file with no tensors, two with only empty tensors, one with a real tensor."""
    paths = {k: tmp_path / f"{k}.safetensors" for k in ("none", "empty", "empty2", "real")}
    save_file({}, paths["none"])
    save_file({"w": torch.zeros(0, 4, dtype=torch.bfloat16), "b": torch.zeros(0, dtype=torch.bfloat16)}, paths["empty"])
    save_file({"w": torch.ones(0, 4, dtype=torch.bfloat16), "b": torch.zeros(0, dtype=torch.bfloat16)}, paths["empty2"])
    save_file({"x": torch.ones(3, dtype=torch.bfloat16)}, paths["real"])
    return paths


CASES = [  # base, tuned, extra options, what the message says
    ("none", "none", [], "holds no tensors"),
    ("empty", "empty2", [], "the 2 tensors both hold are empty (0 parameters)"),
    ("none", "real", ["--allow-mismatch"], "holds no tensors"),
    ("empty", "real", ["--allow-mismatch"], "no tensor in common"),
]


@pytest.mark.parametrize("base,tuned,extra,why", CASES)
def test_compare_and_mask_refuse_zero_parameters(empties, tmp_path, cli, expect_error, base, tuned, extra, why):
    b, t = empties[base], empties[tuned]
    out_dir = tmp_path / "report"
    code, out, err = cli("compare", b, t, *extra, "--out", out_dir, "-q")
    line = expect_error(code, err, str(b), why)
    assert "nothing to compare" in line and "sparsity" not in out
    assert not out_dir.exists()
    code, out, err = cli("compare", b, t, *extra, "--json", "-q")
    expect_error(code, err, str(b), why)
    assert out == ""
    code, _, err = cli("mask", b, t, *extra, "-o", tmp_path / "m.mask", "-q")
    expect_error(code, err, str(b), why)
    assert not (tmp_path / "m.mask").exists()


@pytest.mark.parametrize("tuned,why", [("none", "holds no tensors"), ("empty2", "holds only empty tensors (2, 0 parameters)")])
def test_patch_create_refuses_a_target_without_parameters(empties, tmp_path, cli, expect_error, tuned, why):
    for base in ("none", str(empties["empty"])):
        code, _, err = cli("patch", "create", base, empties[tuned], "-o", tmp_path / "p.rlpatch", "-q")
        expect_error(code, err, str(empties[tuned]), why, "nothing to patch")
        assert not (tmp_path / "p.rlpatch").exists()


def test_masks_without_parameters_are_refused(tmp_path, cli, expect_error):
    empty = Mask({"w": (0, 4)}, {"w": np.empty(0, dtype=np.uint8)}, {"kind": "changed", "atol": 0.0, "dtype": "bf16"})
    a, b = tmp_path / "a.mask", tmp_path / "b.mask"
    empty.save(a)
    empty.save(b)
    code, _, err = cli("overlap", a, b, "--out", tmp_path / "ov", "-q")
    expect_error(code, err, str(a), "cover no parameters", "nothing to overlap")
    assert not (tmp_path / "ov").exists()
    code, _, err = cli("mask", "--random", a, "-o", tmp_path / "r.mask")
    expect_error(code, err, "covers no parameters")
    assert not (tmp_path / "r.mask").exists()


def test_python_api_refuses_zero_parameters(empties):
    real = {"x": torch.ones(3)}
    for base, tuned in [({}, {}), ({"w": torch.zeros(0)}, {"w": torch.zeros(0)}), (str(empties["none"]), str(empties["none"]))]:
        with pytest.raises(RlsubnetError, match="nothing to compare"):
            rlsubnet.compare(base, tuned)
        with pytest.raises(RlsubnetError, match="nothing to compare"):
            rlsubnet.compare_many(real, [real, tuned], allow_mismatch=True)
        with pytest.raises(RlsubnetError, match="nothing to mask"):
            build_mask(base, tuned)
        with pytest.raises(RlsubnetError, match="nothing to mask"):
            identity(base, tuned)
    empty = Mask.from_bool({"w": np.zeros(0, dtype=bool)})
    with pytest.raises(RlsubnetError, match="nothing to overlap"):
        overlap_many([empty, empty])
    with pytest.raises(RlsubnetError, match="no density to match"):
        random_mask(empty, density=0.5)
    # one real parameter is enough to measure
    assert rlsubnet.compare({"x": torch.ones(1), "e": torch.zeros(0)}, {"x": torch.ones(1) * 2, "e": torch.zeros(0)}).density(0.0) == 1.0
