"""``rlsubnet patch create|apply|info`` end to end through the CLI entry point."""

from __future__ import annotations

import hashlib
import json

from patch.patch_helpers import assert_same_checkpoint
from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.checkpoint.hashing import hash_checkpoint
from rlsubnet.cli.main import main
from rlsubnet.testing import llama_specs, write_synthetic_pair


def test_create_info_apply(tmp_path, capsys):
    b, t = tmp_path / "base", tmp_path / "tuned"
    changed = write_synthetic_pair(b, t, specs=llama_specs(2, 32, 64, 48), density=0.1, seed=2, max_shard_bytes=8 << 10)
    (b / "config.json").write_text('{"a": 1}')
    (t / "config.json").write_text('{"a": 1}')
    p = tmp_path / "p.rlpatch"
    assert main(["patch", "create", str(b), str(t), "-o", str(p), "-q", "--json", "--meta", "step=12"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["changed"] == changed
    assert info["metadata"] == {"step": "12"}
    assert info["files"] == [
        {"name": "config.json", "nbytes": 8, "sha256": hashlib.sha256(b'{"a": 1}').hexdigest(), "source": "base"}
    ]
    for side, folder in (("base", b), ("target", t)):  # the content hashes, computed here from the checkpoints
        with open_checkpoint(folder) as ck:
            assert info[side]["hash"] == hash_checkpoint(ck).digest, side
    assert {m["group"] for m in info["modules"]} >= {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm"}
    norm = next(m for m in info["modules"] if m["group"] == "norm")
    assert norm["changed"] == 0 and norm["patch_nbytes"] == 0
    assert abs(info["density"] - changed / info["totals"]["compared_numel"]) < 1e-12

    assert main(["patch", "info", str(p), "--verify", "--tensors", "--layers"]) == 0
    text = capsys.readouterr().out
    assert f"changed  {changed:,} of" in text and "verified: every record matches its sha256" in text
    assert info["base"]["hash"] in text and info["target"]["hash"] in text
    assert "model.layers.1.mlp.down_proj.weight" in text and "bits/changed" in text

    assert main(["patch", "apply", str(b), str(p), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert "verified" in capsys.readouterr().out
    assert_same_checkpoint(t, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == '{"a": 1}'
    assert main(["patch", "apply", str(b), str(p), "-o", str(tmp_path / "out1"), "-q", "--verify-base-first"]) == 0
    assert_same_checkpoint(t, tmp_path / "out1")

    # a chain from a full anchor, no base
    anchor = tmp_path / "a.rlpatch"
    assert main(["patch", "create", "none", str(b), "-o", str(anchor), "-q"]) == 0
    capsys.readouterr()
    assert main(["patch", "apply", str(anchor), str(p), "-o", str(tmp_path / "out2"), "-q", "--weights-only"]) == 0
    assert_same_checkpoint(t, tmp_path / "out2")
    assert main(["patch", "info", str(anchor)]) == 0
    assert "base     none: a full anchor" in capsys.readouterr().out


def test_usage_errors(tmp_path, capsys):
    assert main(["patch"]) == 2
    assert main(["patch", "create", "a", "b", "-o", str(tmp_path / "p"), "--level", "30"]) == 2
    assert "--level must be at most 22" in capsys.readouterr().err
    assert main(["patch", "create", str(tmp_path / "nope"), str(tmp_path / "nope"), "-o", str(tmp_path / "p")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
