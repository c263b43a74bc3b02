"""Every refusal: wrong base, wrong order, truncated, tampered, newer format, differing tensor sets.

Each must raise a clear error and leave no output (and no temporary leftovers) behind.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from patch.patch_helpers import (
    assert_nothing_left,
    assert_same_checkpoint,
    edge_pair,
    rewrite_manifest,
    write_pair,
)
from rlsubnet.checkpoint import save_state_dict
from rlsubnet.cli.main import main
from rlsubnet.errors import MismatchError, RlsubnetError
from rlsubnet.patch import PatchError, PatchVersionError, WrongBaseError, apply_patches, create_patch


@pytest.fixture
def made(bf16_pair, tmp_path):
    b, t = bf16_pair
    return b, t, create_patch(b, t, tmp_path / "p.rlpatch").path


@pytest.mark.parametrize("first", [False, True])
def test_wrong_base_content_is_refused(made, tmp_path, first):
    b, t, p = made
    with pytest.raises(WrongBaseError, match="not the base .* tensor\\(s\\) differ .*nothing written"):
        apply_patches(t, [p], tmp_path / "out", verify_base_first=first)
    assert_nothing_left(tmp_path, "out")


def test_base_differing_in_one_late_tensor_is_refused(tmp_path):
    base, tuned = edge_pair(torch.bfloat16)
    b, t = write_pair(tmp_path, base, tuned)
    p = create_patch(b, t, tmp_path / "p.rlpatch").path
    other = dict(base)
    other["model.empty"] = base["model.empty"]
    other["model.scale"] = torch.tensor(1.5078125, dtype=torch.bfloat16)  # one ULP off, in the last shard
    save_state_dict(other, tmp_path / "other", max_shard_bytes=2048)
    for first in (False, True):
        with pytest.raises(WrongBaseError, match="model.scale"):
            apply_patches(tmp_path / "other", [p], tmp_path / "out", verify_base_first=first)
        assert_nothing_left(tmp_path, "out")


def test_wrong_base_layout_is_refused_before_reading(made, tmp_path):
    b, t, p = made
    base, _ = edge_pair(torch.bfloat16)
    del base["model.scale"]
    base["model.extra"] = torch.zeros(3)
    save_state_dict(base, tmp_path / "other")
    with pytest.raises(WrongBaseError, match="1 tensors missing: model.scale; 1 unexpected tensors: model.extra"):
        apply_patches(tmp_path / "other", [p], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def test_chain_in_wrong_order_is_refused(tmp_path):
    a, b_ = edge_pair(torch.bfloat16, seed=1)
    c = {n: x * 3 for n, x in b_.items()}
    for name, sd in (("A", a), ("B", b_), ("C", c)):
        save_state_dict(sd, tmp_path / name)
    p1 = create_patch(tmp_path / "A", tmp_path / "B", tmp_path / "p1.rlpatch").path
    p2 = create_patch(tmp_path / "B", tmp_path / "C", tmp_path / "p2.rlpatch").path
    with pytest.raises(WrongBaseError, match="p1.rlpatch: expects base .* wrong order"):
        apply_patches(tmp_path / "B", [p2, p1], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")
    with pytest.raises(WrongBaseError, match="not the base"):  # skipping p1
        apply_patches(tmp_path / "A", [p2], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")
    anchor = create_patch(None, tmp_path / "B", tmp_path / "anchor.rlpatch").path
    with pytest.raises(WrongBaseError, match="full anchor: it can only start a chain"):
        apply_patches(tmp_path / "A", [p1, anchor], tmp_path / "out")


@pytest.mark.parametrize("cut", [1, 8, 56, 400, -100])
def test_truncated_patch_is_refused(made, tmp_path, cut):
    b, t, p = made
    data = p.read_bytes()
    bad = tmp_path / "cut.rlpatch"
    bad.write_bytes(data[: len(data) - cut] if cut > 0 else data[:-cut])
    with pytest.raises(PatchError, match="truncated|damaged|not an rlsubnet patch"):
        apply_patches(b, [bad], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def test_tampered_record_is_refused_before_writing(made, tmp_path):
    b, t, p = made
    data = bytearray(p.read_bytes())
    data[20] ^= 0x01  # inside the first tensor's record
    bad = tmp_path / "bad.rlpatch"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="record hash mismatch: the patch was modified or damaged"):
        apply_patches(b, [bad], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")
    assert main(["patch", "info", str(bad)]) == 0  # the manifest is intact: info still reads it
    assert main(["patch", "info", str(bad), "--verify"]) == 2


def test_tampered_manifest_is_refused(made, tmp_path):
    b, t, p = made
    data = bytearray(p.read_bytes())
    m_off, m_len = struct.unpack("<QQ", data[-56:-40])
    data[m_off + m_len // 2] ^= 0x40
    bad = tmp_path / "bad.rlpatch"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="manifest hash mismatch"):
        apply_patches(b, [bad], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def _with_head_word(p, tmp_path, offset: int, value: int, name: str):
    """A copy of patch ``p`` with the u32 of its head at byte ``offset`` (8: version, 12: flags) set to ``value``."""
    data = bytearray(p.read_bytes())
    data[offset : offset + 4] = struct.pack("<I", value)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


def test_newer_format_version_is_refused(made, tmp_path):
    b, t, p = made
    newer = _with_head_word(p, tmp_path, 8, 3, "newer.rlpatch")
    with pytest.raises(PatchVersionError, match="format version 3 is newer than this rlsubnet .* reads \\(up to 2\\); upgrade"):
        apply_patches(b, [newer], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")
    older = _with_head_word(p, tmp_path, 8, 1, "older.rlpatch")  # the development format with SHA-256 content hashes
    with pytest.raises(PatchVersionError, match="format version 1 .* no longer read; re-create the patch"):
        apply_patches(b, [older], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def test_differing_tensor_sets(tmp_path):
    base, tuned = edge_pair(torch.float32)
    del tuned["model.scale"]  # removed
    tuned["model.new"] = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # added
    tuned["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"].to(torch.bfloat16)
    tuned["model.layers.0.self_attn.k_proj.weight"] = base["model.layers.0.self_attn.k_proj.weight"].reshape(9, 7)
    b, t = write_pair(tmp_path, base, tuned)
    with pytest.raises(MismatchError, match="missing from the target: model.scale; 1 only in the target: model.new; 2 with another dtype or shape"):
        create_patch(b, t, tmp_path / "p.rlpatch")
    assert not (tmp_path / "p.rlpatch").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".p.rlpatch")]
    p = create_patch(b, t, tmp_path / "p.rlpatch", allow_mismatch=True)
    ops = {e["name"]: e["op"] for e in p.manifest["tensors"]}
    assert ops["model.scale"] == "remove" and ops["model.new"] == "full"
    assert ops["model.layers.0.input_layernorm.weight"] == "full" and ops["model.layers.0.self_attn.k_proj.weight"] == "full"
    apply_patches(b, [p.path], tmp_path / "out")
    assert_same_checkpoint(t, tmp_path / "out")


def test_existing_output_is_not_overwritten(made, tmp_path):
    b, t, p = made
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(RlsubnetError, match="exists \(choose another output or pass --overwrite\)"):
        apply_patches(b, [p], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(PatchError, match="exists"):
        create_patch(b, t, p)
    apply_patches(b, [p], tmp_path / "out", overwrite=True)
    assert_same_checkpoint(t, tmp_path / "out")


def test_changed_base_file_is_refused(made, tmp_path):
    b, t, _ = made
    (b / "config.json").write_text("{}")
    (t / "config.json").write_text("{}")
    p = create_patch(b, t, tmp_path / "f.rlpatch").path
    (b / "config.json").write_text('{"edited": true}')
    with pytest.raises(WrongBaseError, match="config.json"):
        apply_patches(b, [p], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def test_cli_prints_one_line_and_exits_2(made, tmp_path, capsys):
    b, t, p = made
    assert main(["patch", "apply", str(t), str(p), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlsubnet: error: ") and "not the base" in err[0]
    assert_nothing_left(tmp_path, "out")
    assert main(["patch", "apply", str(p), "-o", str(tmp_path / "out")]) == 2
    assert "delta patch: give the base" in capsys.readouterr().err
    assert main(["patch", "info", str(b / "model-00001-of-00002.safetensors")]) == 2
    assert "not an rlsubnet patch" in capsys.readouterr().err


def _rewrite_manifest(p, tmp_path, mutate):
    return rewrite_manifest(p, tmp_path / "edited.rlpatch", mutate)


def _drop_from_tensors(key, inner=None):
    def mutate(m):
        for t in m["tensors"]:
            if inner is None:
                t.pop(key, None)
            elif t.get(inner):
                t[inner].pop(key, None)
    return mutate


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda m: m.pop("totals"), "'totals'"),
        (lambda m: m["totals"].pop("compared_numel"), "'compared_numel'"),
        (_drop_from_tensors("numel"), "'numel'"),
        (_drop_from_tensors("sha256", inner="record"), "'sha256'"),
        (lambda m: m.__setitem__("tensors", [1, 2]), "without a name"),
        (lambda m: m["tensors"][0].__setitem__("shape", [-1, 3]), "shape"),
        (lambda m: m["target"].pop("nbytes"), "'nbytes'"),
    ],
)
def test_incomplete_manifest_is_refused_in_one_line(made, tmp_path, capsys, mutate, needle):
    b, t, p = made
    bad = _rewrite_manifest(p, tmp_path, mutate)
    with pytest.raises(PatchError, match="damaged manifest"):
        apply_patches(b, [bad], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")
    for argv in (["patch", "info", str(bad)], ["patch", "apply", str(b), str(bad), "-o", str(tmp_path / "out"), "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "damaged manifest" in err[0] and needle in err[0], err


def test_unknown_header_flags_are_refused(made, tmp_path):
    b, t, p = made
    bad = _with_head_word(p, tmp_path, 12, 1, "flags.rlpatch")
    with pytest.raises(PatchError, match="unknown header flags 0x1"):
        apply_patches(b, [bad], tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


def test_outputs_under_a_regular_file_give_one_line(made, tmp_path, capsys):
    b, t, p = made
    (tmp_path / "afile").write_text("x")
    for argv in (["patch", "apply", str(b), str(p), "-o", str(tmp_path / "afile" / "out"), "-q"],
                 ["patch", "create", str(b), str(t), "-o", str(tmp_path / "afile" / "p.rlpatch"), "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"rlsubnet: error: {tmp_path / 'afile'}: is not a folder; cannot write " \
            f"{Path(argv[-2]).name} under it", err
    assert (tmp_path / "afile").read_text() == "x"
