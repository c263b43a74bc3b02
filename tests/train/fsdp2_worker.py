"""Worker for test_sparse_optim.py (not a test module): masked training of a tiny model under FSDP2
(``fully_shard`` per layer, then the root) across two gloo processes, or in one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/fsdp2_worker.py --out DIR
    python tests/train/fsdp2_worker.py --single --out DIR

Every run sees the same global batches of 16 rows per step; under FSDP2 rank r takes rows [8r, 8r + 8) and the
reduce-scatter averages, so the gradient equals the single process's full-batch mean up to summation order.
Odd row counts (37, 23) make the shards uneven. Variants: the sparse optimizer on fp32 and on bf16 weights, the
dense MaskedOptimizer (AdamW, clip_grad_norm_ on the DTensor gradients), and the sparse fp32 run stopped after
4 steps and resumed from each rank's saved state in a freshly sharded model. AdamW, weight decay 0.1, clipping
by the full gradient's norm, then the mask.
"""

from __future__ import annotations

import argparse
import io
import os

import torch
import torch.distributed as dist

from rlsubnet.masks import Mask, random_mask
from rlsubnet.train import MaskedOptimizer, SparseMaskedOptimizer

VOCAB, HIDDEN, WIDE, STEPS, GLOBAL_BATCH = 23, 16, 37, 8, 16


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.up_proj = torch.nn.Linear(HIDDEN, WIDE)
        self.down_proj = torch.nn.Linear(WIDE, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.shape == (HIDDEN,) else 0.0))
        self.to(dtype)

    def forward(self, x):
        h = self.embed_tokens(x)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(self.norm(h))


def make_mask() -> Mask:
    m = random_mask({n: tuple(p.shape) for n, p in Tiny().named_parameters()}, density=0.25, seed=3)
    t = {n: m.tensor(n) for n in m.names()}
    t["norm.weight"][:] = False
    t["norm.bias"][:] = False
    t["down_proj.bias"][:] = True
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"})


def shard(model, world):
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in (model.embed_tokens, model.up_proj, model.down_proj, model.norm, model.lm_head):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def steps(model, opt, rank, world, first, last, dense=False):
    data = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // world
    for i in range(last):
        x = torch.randint(0, VOCAB, (GLOBAL_BATCH, 6), generator=data)
        y = torch.randint(0, VOCAB, (GLOBAL_BATCH, 6), generator=data)
        if i < first:
            continue  # same data stream when resuming
        xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        loss = torch.nn.functional.cross_entropy(model(xs).float().reshape(-1, VOCAB), ys.reshape(-1))
        loss.backward()
        if dense:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)


def sparse_opt(model):
    return SparseMaskedOptimizer(model, make_mask(), "adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)


def train(variant, rank, world):
    dtype = torch.bfloat16 if variant == "sparse_bf16" else torch.float32
    model = shard(Tiny(dtype), world)
    if variant == "dense_fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        masked = MaskedOptimizer(opt, make_mask(), model, verify_steps=STEPS)
        steps(model, opt, rank, world, 0, STEPS, dense=True)
        assert masked.steps == STEPS
        return full(model), None
    opt = sparse_opt(model)
    if variant == "sparse_resumed":
        steps(model, opt, rank, world, 0, STEPS // 2)
        buf = io.BytesIO()
        torch.save({"model": full(model), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        fresh = Tiny(dtype)
        fresh.load_state_dict(ck["model"])
        model = shard(fresh, world)
        opt = sparse_opt(model)
        opt.load_state_dict(ck["opt"])
        steps(model, opt, rank, world, STEPS // 2, STEPS)
    else:
        steps(model, opt, rank, world, 0, STEPS)
    assert opt.steps == STEPS and opt.sharded == (world > 1)
    return full(model), opt.local_trainable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--single", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.single:
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    variants = ("sparse_fp32", "sparse_bf16", "dense_fp32", "sparse_resumed")
    result = {"mask": {n: make_mask().tensor(n) for n, _ in Tiny().named_parameters()}, "world": world,
              "initial": {}, "local_trainable": {}}
    for v in variants:
        result["initial"][v] = {n: p.detach().clone() for n, p in
                                Tiny(torch.bfloat16 if v == "sparse_bf16" else torch.float32).named_parameters()}
        result[v], result["local_trainable"][v] = train(v, rank, world)
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, "single.pt" if args.single else f"rank{rank}.pt"))
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
