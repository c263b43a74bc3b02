"""Bit-exact round trips: create a patch, apply it, compare raw bytes, counts and layout."""

from __future__ import annotations

import json

import pytest
import torch

from patch.patch_helpers import assert_same_checkpoint, bits, edge_pair, write_pair
from rlsubnet.checkpoint import open_checkpoint, save_state_dict
from rlsubnet.checkpoint.hashing import hash_checkpoint
from rlsubnet.patch import PatchFile, apply_patches, create_patch, write_patch


def expected_changed(base: dict, tuned: dict) -> dict[str, int]:
    return {n: int((bits(base[n]) != bits(tuned[n])).sum()) for n in base}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("values", ["xor", "absolute"])
def test_round_trip_is_bit_exact(tmp_path, dtype, values):
    base, tuned = edge_pair(dtype, seed=3)
    b, t = write_pair(tmp_path, base, tuned)
    summary = create_patch(b, t, tmp_path / "p.rlpatch", values=values)
    out = apply_patches(b, [summary.path], tmp_path / "out")
    assert_same_checkpoint(t, tmp_path / "out")
    assert out.target_hash == hash_checkpoint(open_checkpoint(t)).digest == summary.manifest["target"]["hash"]

    entries = {e["name"]: e for e in summary.manifest["tensors"]}
    want = expected_changed(base, tuned)
    assert {n: e["changed"] for n, e in entries.items()} == want
    assert want["model.layers.0.self_attn.q_proj.weight"] == 3  # NaN payload, -0, 0 -> NaN; same NaNs are unchanged
    assert want["model.layers.0.self_attn.k_proj.weight"] == 63  # every entry
    assert entries["model.layers.0.input_layernorm.weight"]["op"] == "same"
    assert entries["model.layers.0.input_layernorm.weight"]["record"] is None
    assert entries["model.empty"]["op"] == "same"
    assert summary.manifest["totals"]["changed"] == sum(want.values())


def test_output_keeps_the_base_layout(bf16_pair, tmp_path):
    b, t = bf16_pair
    # the tuned side is stored differently (one file): the output still follows the base's shards
    tuned_single = tmp_path / "tuned1"
    save_state_dict({n: open_checkpoint(t).read(n) for n in open_checkpoint(t).names()}, tuned_single)
    p = create_patch(b, tuned_single, tmp_path / "p.rlpatch")
    apply_patches(b, [p.path], tmp_path / "out")
    base_files = sorted(f.name for f in b.iterdir())
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == base_files
    assert len([f for f in base_files if f.endswith(".safetensors")]) >= 2
    bmap = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    omap = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert bmap == omap
    assert_same_checkpoint(t, tmp_path / "out")


def test_single_file_output(tmp_path):
    base, tuned = edge_pair(torch.float32)
    b, t = write_pair(tmp_path, base, tuned, shard_bytes=None)
    p = create_patch(b / "model.safetensors", t / "model.safetensors", tmp_path / "p.rlpatch")
    apply_patches(b / "model.safetensors", [p.path], tmp_path / "out.safetensors")
    assert_same_checkpoint(t, tmp_path / "out.safetensors")


def big_pair(numel: int, seed: int = 0) -> tuple[dict, dict]:
    """Regions of every density, so one tensor's coding blocks use bitmaps and 1-, 2- and 4-byte gaps."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16)
    t = w.clone()
    tb = bits(t)
    dense = torch.arange(0, 40_000)[torch.rand(40_000, generator=g) < 0.5]  # bitmap blocks
    medium = 50_000 + torch.randperm(30_000, generator=g)[:3_000]  # 1-byte gaps
    sparse = 90_000 + torch.randperm(60_000, generator=g)[:300]  # 2-byte gaps
    far = torch.tensor([160_000, 160_001, 250_000, numel - 1])  # a gap over 65,535: 4-byte gaps
    idx = torch.cat([dense, medium, sparse, far]).unique()
    tb[idx] ^= torch.randint(1, 1 << 15, (len(idx),), generator=g, dtype=torch.int16)
    return {"w": w.reshape(-1, 7) if numel % 7 == 0 else w}, {"w": t.reshape(-1, 7) if numel % 7 == 0 else t}


@pytest.mark.parametrize("values", ["xor", "absolute"])
def test_block_codings_and_unaligned_reads(tmp_path, values):
    """Small coding blocks and read sizes that do not line up with them, on both sides."""
    base, tuned = big_pair(300_003)
    b, t = write_pair(tmp_path, base, tuned, shard_bytes=None)
    ck_b, ck_t = open_checkpoint(b), open_checkpoint(t)
    s = write_patch(ck_b, ck_t, tmp_path / "p.rlpatch", values=values, block_numel=1 << 17, read_bytes=1 << 18)
    assert s.changed == int((bits(base["w"]) != bits(tuned["w"])).sum())
    apply_patches(b, [s.path], tmp_path / "out", read_bytes=3 * 7919)
    assert_same_checkpoint(t, tmp_path / "out")
    s2 = write_patch(ck_b, ck_t, tmp_path / "p2.rlpatch", values=values, block_numel=1000, read_bytes=50_000)
    apply_patches(b, [s2.path], tmp_path / "out2", read_bytes=1 << 20, verify_base_first=False)
    assert_same_checkpoint(t, tmp_path / "out2")


def test_none_changed_and_all_changed_checkpoints(tmp_path):
    base, tuned = edge_pair(torch.bfloat16)
    b, t = write_pair(tmp_path, base, tuned)
    same = create_patch(b, b, tmp_path / "same.rlpatch")
    assert same.changed == 0 and all(e["op"] == "same" for e in same.manifest["tensors"])
    assert same.manifest["base"]["hash"] == same.manifest["target"]["hash"]
    apply_patches(b, [same.path], tmp_path / "o1")
    assert_same_checkpoint(b, tmp_path / "o1")
    flipped = {n: (bits(x) ^ -1).view(x.dtype) for n, x in base.items()}
    b2, t2 = write_pair(tmp_path / "all", base, flipped)
    p = create_patch(b2, t2, tmp_path / "all.rlpatch")
    assert p.changed == sum(x.numel() for x in base.values())
    apply_patches(b2, [p.path], tmp_path / "o2")
    assert_same_checkpoint(t2, tmp_path / "o2")


def test_chain_and_anchor(tmp_path):
    a, b_ = edge_pair(torch.bfloat16, seed=1)
    _, c = edge_pair(torch.bfloat16, seed=2)
    c = {n: x.clone() for n, x in b_.items()} | {"model.scale": torch.tensor(7.0, dtype=torch.bfloat16)}
    c["model.layers.0.mlp.up_proj.weight"] = b_["model.layers.0.mlp.up_proj.weight"] * 2
    save_state_dict(a, tmp_path / "A", max_shard_bytes=2048)
    save_state_dict(b_, tmp_path / "B", max_shard_bytes=2048)
    save_state_dict(c, tmp_path / "C")
    p1 = create_patch(tmp_path / "A", tmp_path / "B", tmp_path / "p1.rlpatch")
    p2 = create_patch(tmp_path / "B", tmp_path / "C", tmp_path / "p2.rlpatch", values="absolute")
    apply_patches(tmp_path / "A", [p1.path, p2.path], tmp_path / "out")
    assert_same_checkpoint(tmp_path / "C", tmp_path / "out")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(f.name for f in (tmp_path / "A").iterdir())

    anchor = create_patch(None, tmp_path / "B", tmp_path / "anchor.rlpatch")
    assert anchor.manifest["kind"] == "anchor" and anchor.manifest["base"] is None
    apply_patches(None, [anchor.path, p2.path], tmp_path / "from-anchor")
    assert_same_checkpoint(tmp_path / "C", tmp_path / "from-anchor")


def test_patch_bytes_are_deterministic(bf16_pair, tmp_path):
    b, t = bf16_pair
    one = create_patch(b, t, tmp_path / "1.rlpatch").path.read_bytes()
    two = create_patch(b, t, tmp_path / "2.rlpatch").path.read_bytes()
    assert one == two
    assert one[:16] == b"RLSPATCH" + (2).to_bytes(4, "little") + (0).to_bytes(4, "little")
    assert one[-8:] == b"RLSPEND\0"


def test_int_and_bool_tensors_round_trip(tmp_path):
    base = {"ids": torch.arange(100, dtype=torch.int64), "mask": torch.zeros(50, dtype=torch.bool),
            "q": torch.arange(256, dtype=torch.uint8), "h": torch.randn(30, dtype=torch.float64),
            "f8": torch.randn(40).to(torch.float8_e4m3fn)}
    tuned = {"ids": base["ids"].clone(), "mask": base["mask"].clone(), "q": base["q"].flip(0), "h": base["h"] + 1e-300,
             "f8": (base["f8"].float() * 1.5).to(torch.float8_e4m3fn)}
    tuned["ids"][[3, 99]] = torch.tensor([-(2**62), 2**62 + 1])
    tuned["mask"][::7] = True
    b, t = write_pair(tmp_path, base, tuned, shard_bytes=None)
    p = create_patch(b, t, tmp_path / "p.rlpatch")
    apply_patches(b, [p.path], tmp_path / "out")
    assert_same_checkpoint(t, tmp_path / "out")
    assert PatchFile.open(p.path).entries()["mask"]["changed"] == 8


def test_non_weight_files_travel_with_the_patch(bf16_pair, tmp_path):
    b, t = bf16_pair
    for folder in (b, t):
        (folder / "config.json").write_text('{"model_type": "llama"}\n')
        (folder / "tokenizer.json").write_text('{"v": 1}\n')
    (b / "generation_config.json").write_text('{"temperature": 1.0}\n')
    (t / "generation_config.json").write_text('{"temperature": 0.6}\n')
    (t / "chat_template.jinja").write_text("{{ messages }}")
    (t / "extra").mkdir()
    (t / "training_args.bin").write_bytes(b"pickle")
    p = create_patch(b, t, tmp_path / "p.rlpatch")
    files = {f["name"]: f["source"] for f in p.manifest["files"]}
    assert files == {"config.json": "base", "tokenizer.json": "base", "generation_config.json": "patch", "chat_template.jinja": "patch"}
    assert p.manifest["skipped_files"] == [
        {"name": "extra/", "reason": "sub-folder"},
        {"name": "training_args.bin", "reason": "weights or pickle file, not part of this checkpoint"},
    ]
    out = apply_patches(b, [p.path], tmp_path / "out")
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (t / name).read_bytes()
    assert sorted(out.files) == sorted(files)
    apply_patches(b, [p.path], tmp_path / "w", include_files=False)
    assert not (tmp_path / "w" / "config.json").exists()


def test_pickle_base_with_opt_in(tmp_path):
    base, tuned = edge_pair(torch.float16)
    (tmp_path / "pt").mkdir()
    torch.save(base, tmp_path / "pt" / "pytorch_model.bin")
    save_state_dict(tuned, tmp_path / "tuned")
    from rlsubnet.errors import CheckpointError

    with pytest.raises(CheckpointError, match="allow-pickle"):
        create_patch(tmp_path / "pt", tmp_path / "tuned", tmp_path / "p.rlpatch")
    p = create_patch(tmp_path / "pt", tmp_path / "tuned", tmp_path / "p.rlpatch", allow_pickle=True)
    apply_patches(tmp_path / "pt", [p.path], tmp_path / "out", allow_pickle=True)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert_same_checkpoint(tmp_path / "tuned", tmp_path / "out")


def test_reads_are_bounded_blocks_not_whole_tensors(tmp_path):
    """Streaming: no read is larger than the read block, whatever the tensor size."""
    from rlsubnet.checkpoint import SafetensorsCheckpoint
    from rlsubnet.checkpoint.reader import safetensors_files_in

    class Tracking(SafetensorsCheckpoint):
        def read_flat(self, name, start, stop):
            self.sizes.append(stop - start)
            return super().read_flat(name, start, stop)

        def read_flat_into(self, name, start, stop, out):
            self.sizes.append(stop - start)
            return super().read_flat_into(name, start, stop, out)

    def tracked(folder):
        ck = Tracking(str(folder), str(folder), *safetensors_files_in(folder))
        ck.sizes = []
        return ck

    base, tuned = big_pair(300_003)
    b, t = write_pair(tmp_path, base, tuned, shard_bytes=None)
    cb, ct = tracked(b), tracked(t)
    s = write_patch(cb, ct, tmp_path / "p.rlpatch", block_numel=1 << 13, read_bytes=1 << 16)
    assert max(cb.sizes) == max(ct.sizes) == 1 << 15 and sum(ct.sizes) == 300_003
    cb2 = tracked(b)
    apply_patches(cb2, [s.path], tmp_path / "out", read_bytes=1 << 14, verify_base_first=False)
    assert max(cb2.sizes) == 1 << 13 and sum(cb2.sizes) == 300_003
    assert_same_checkpoint(t, tmp_path / "out")
