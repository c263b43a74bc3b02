"""Helpers for the patch tests (import as `from patch.patch_helpers import ...`; tests/ is on pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch

from rlsubnet.checkpoint import open_checkpoint, save_state_dict

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
NAN_BITS = {torch.bfloat16: (0x7FC1, 0xFFA3), torch.float16: (0x7E01, 0xFE33), torch.float32: (0x7FC00001, 0x7FA00007)}


def signed(v: int, dtype: torch.dtype) -> int:
    nbits = 8 * torch.empty((), dtype=dtype).element_size()
    return v - (1 << nbits) if v >= 1 << (nbits - 1) else v


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_OF[t.element_size()])


def edge_pair(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """Base and tuned tensors covering random changes, NaN payloads, ±0, all/none changed, scalar and empty."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}

    w = (torch.randn(40, 33, generator=g) * 0.02).to(dtype)
    t = w.clone()
    flat = bits(t).view(-1)
    idx = torch.randperm(w.numel(), generator=g)[:150]
    flat[idx[:100]] += 1  # one ULP up
    flat[idx[100:]] = bits((torch.randn(50, generator=g) * 0.02).to(dtype))  # arbitrary new values
    base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"] = w, t

    nan_a, nan_b = (signed(v, dtype) for v in NAN_BITS[dtype])
    s = torch.zeros(64, dtype=dtype)
    bs = bits(s)
    bs[0], bs[1], bs[4] = nan_a, nan_a, nan_a
    u = s.clone()
    bu = bits(u)
    bu[0] = nan_b  # NaN -> NaN with another payload: changed
    u[2] = -0.0  # +0 -> -0: changed
    bu[5] = nan_b  # 0 -> NaN: changed
    # [1] and [4]: the same NaN payload on both sides, [3]: +0 on both: unchanged
    assert torch.isnan(s[0]) and torch.isnan(u[0]) and (u[2] == s[2])
    base["model.layers.0.self_attn.q_proj.weight"], tuned["model.layers.0.self_attn.q_proj.weight"] = s, u

    a = torch.randn(7, 9, generator=g).to(dtype)
    nbits = 8 * a.element_size()
    flip = torch.randint(1, 1 << (nbits - 1), a.shape, generator=g).to(bits(a).dtype)
    base["model.layers.0.self_attn.k_proj.weight"] = a
    tuned["model.layers.0.self_attn.k_proj.weight"] = (bits(a) ^ flip).view(dtype)  # every entry changed
    n = torch.randn(33, generator=g).to(dtype)
    base["model.layers.0.input_layernorm.weight"], tuned["model.layers.0.input_layernorm.weight"] = n, n.clone()  # none
    base["model.scale"], tuned["model.scale"] = torch.tensor(1.5, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
    base["model.empty"], tuned["model.empty"] = torch.empty(0, 4, dtype=dtype), torch.empty(0, 4, dtype=dtype)
    return base, tuned


def write_pair(root: Path, base: dict, tuned: dict, shard_bytes: int | None = 2048) -> tuple[Path, Path]:
    save_state_dict(base, root / "base", max_shard_bytes=shard_bytes)
    save_state_dict(tuned, root / "tuned", max_shard_bytes=shard_bytes)
    return root / "base", root / "tuned"


def assert_same_checkpoint(expected, got) -> None:
    """Same tensor names, dtypes, shapes and raw bytes."""
    a, b = open_checkpoint(expected), open_checkpoint(got)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert bytes(x.reshape(-1).view(torch.uint8).numpy()) == bytes(y.reshape(-1).view(torch.uint8).numpy()), name


def assert_nothing_left(parent: Path, out_name: str) -> None:
    """No output and no temporary leftovers of it."""
    assert not (parent / out_name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]


def with_manifest_area(data: bytes, area: bytes) -> bytes:
    """``data`` (a patch's bytes) with its manifest area replaced by ``area`` and the trailer recomputed to
    match: what a writer who controls the file, but holds no signing key, can produce."""
    import hashlib

    from rlsubnet.patch.format import TRAILER

    m_off, _, _, end = TRAILER.unpack(data[-TRAILER.size:])
    return data[:m_off] + area + TRAILER.pack(m_off, len(area), hashlib.sha256(area).digest(), end)


def rewrite_manifest(p: Path, out: Path, mutate) -> Path:
    """A copy of patch ``p`` at ``out`` whose manifest was edited by ``mutate`` and whose trailer hash was
    recomputed (any signature is dropped with the old manifest): what a buggy or foreign writer would produce.
    Only the manifest's own checks can catch it."""
    import json

    import zstandard

    from rlsubnet.patch.format import TRAILER

    data = Path(p).read_bytes()
    m_off, m_len, _, _ = TRAILER.unpack(data[-TRAILER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(data[m_off : m_off + m_len]))
    mutate(manifest)
    frame = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    out.write_bytes(with_manifest_area(data, frame))
    return out
