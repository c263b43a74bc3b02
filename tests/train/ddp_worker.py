"""Worker for test_ddp.py (not a test module): masked training of a tiny model, under DDP or in one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/ddp_worker.py --out DIR
    python tests/train/ddp_worker.py --single --out DIR

Every run sees the same global batches of 16 rows per step: under DDP rank r takes rows [8r, 8r + 8), so the
DDP-averaged gradient equals the single process's full-batch mean up to fp32 summation order. AdamW with weight
decay 0.1 and gradient clipping (on the full, all-reduced gradient), then the mask, as in the paper. Two models
are trained per run: DDP with gradient_as_bucket_view False and True.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from rlsubnet.masks import Mask, random_mask
from rlsubnet.train import MaskedOptimizer

VOCAB, HIDDEN, STEPS, GLOBAL_BATCH = 23, 16, 8, 16


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.up_proj = torch.nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down_proj = torch.nn.Linear(4 * HIDDEN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.shape == (HIDDEN,) else 0.0))

    def forward(self, x):
        h = self.embed_tokens(x)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(self.norm(h))


def make_mask(model) -> Mask:
    m = random_mask({n: tuple(p.shape) for n, p in model.named_parameters()}, density=0.25, seed=3)
    t = {n: m.tensor(n) for n in m.names()}
    t["norm.weight"][:] = False
    t["norm.bias"][:] = False
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"})


def train(rank: int, world: int, bucket_view: bool) -> dict[str, torch.Tensor]:
    model = Tiny()
    mask = make_mask(model)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    masked = MaskedOptimizer(opt, mask, wrapped, verify_steps=STEPS)
    data = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // world
    for _ in range(STEPS):
        x = torch.randint(0, VOCAB, (GLOBAL_BATCH, 6), generator=data)
        y = torch.randint(0, VOCAB, (GLOBAL_BATCH, 6), generator=data)
        xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        logits = wrapped(xs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ys.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert masked.steps == STEPS
    return {n: p.detach().clone() for n, p in model.named_parameters()}


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
    result = {
        "initial": {n: p.detach().clone() for n, p in Tiny().named_parameters()},
        "mask": {n: make_mask(Tiny()).tensor(n) for n, _ in Tiny().named_parameters()},
        "bucket_view_false": train(rank, world, False),
        "bucket_view_true": train(rank, world, True),
        "world": world,
    }
    os.makedirs(args.out, exist_ok=True)
    name = "single.pt" if args.single else f"rank{rank}.pt"
    torch.save(result, os.path.join(args.out, name))
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
