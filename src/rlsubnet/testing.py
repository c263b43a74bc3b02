"""Synthetic checkpoint pairs with a known number of changed entries, for tests, benchmarks and the first demo.

Tensors use Llama naming and LLM-like magnitudes (N(0, 0.02) weights, ones for norms). The tuned side flips
the lowest mantissa bit of a chosen set of entries: each such entry changes by exactly one bf16 ULP, so the
count changed at atol 0 is known exactly, and small weights' changes fall under atol 1e-5 as in real runs.
Tensors are generated one at a time from per-tensor seeds, so a pair of any size is written in bounded memory.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from rlsubnet._bits import int_view
from rlsubnet.checkpoint.writer import plan_shards, shard_file_names, write_checkpoint


def llama_specs(layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 96, dtype=torch.bfloat16):
    """(name, dtype, shape) of a Llama-style model, embeddings first, as transformers saves them."""
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", dtype, (hidden,)),
            (f"{p}.self_attn.q_proj.weight", dtype, (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", dtype, (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", dtype, (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", dtype, (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", dtype, (hidden,)),
            (f"{p}.mlp.gate_proj.weight", dtype, (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", dtype, (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", dtype, (hidden, intermediate)),
        ]
    specs += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def _generator(seed: int, name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{salt}:{name}".encode()))


def base_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=_generator(seed, name, "w")) * 0.02).to(dtype)


def changed_positions(name: str, numel: int, density: float, seed: int = 0) -> torch.Tensor:
    """Flat positions the tuned side changes: exactly round(density * numel) of them (none in norms)."""
    if "norm" in name or numel == 0:
        return torch.empty(0, dtype=torch.long)
    k = round(density * numel)
    return torch.randperm(numel, generator=_generator(seed, name, "pos"))[:k].sort().values


def tuned_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    """The base tensor with the lowest mantissa bit flipped at :func:`changed_positions` (one ULP each)."""
    t = base_tensor(name, dtype, shape, seed).reshape(-1).clone()
    pos = changed_positions(name, t.numel(), density, seed)
    int_view(t)[pos] ^= 1
    return t.reshape(shape)


def write_synthetic_pair(
    base_dir: str | Path,
    tuned_dir: str | Path,
    *,
    specs=None,
    density: float = 0.2,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> int:
    """Write a base and a tuned checkpoint; return the exact number of entries changed (atol 0)."""
    specs = specs if specs is not None else llama_specs()
    shards = plan_shards(specs, max_shard_bytes) if max_shard_bytes else [specs]
    layout = list(zip(shard_file_names(len(shards)), shards))
    lookup = {n: (d, s) for n, d, s in specs}
    write_checkpoint(base_dir, layout, lambda n: base_tensor(n, *lookup[n], seed=seed))
    write_checkpoint(tuned_dir, layout, lambda n: tuned_tensor(n, *lookup[n], density=density, seed=seed))
    return sum(len(changed_positions(n, torch.Size(s).numel(), density, seed)) for n, _, s in specs)


if __name__ == "__main__":  # python -m rlsubnet.testing OUT_DIR: a small sharded pair to try `rlsubnet compare` on
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic-pair")
    n = write_synthetic_pair(
        out / "base", out / "tuned", specs=llama_specs(4, 128, 256, 128), density=0.2, max_shard_bytes=256 << 10
    )
    print(f"wrote {out}/base and {out}/tuned: {n:,} entries changed by one bf16 ULP")
