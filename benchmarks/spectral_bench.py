"""Seconds per matrix and randomized error of the spectral metrics (rlsubnet.diff.spectral).

    .venv/bin/python benchmarks/spectral_bench.py [--small] [--top-k 16] [--threads N] [--seed 0]

For bf16 pairs of 4096×4096 and 4096×11008 (``--small``: 1024×1024 and 1024×2752):

- W0 like a trained LLM matrix: a Marchenko–Pastur bulk (i.i.d. entries, std 0.02) plus 64 spikes whose
  singular values decay as i^-0.6 from 6× the bulk edge, rounded to bf16;
- W1 like an RL update: 30% of the entries moved by one bf16 ULP, up or down at random (Δ is computed in bf16,
  where it is exact).

Each pair is measured three ways (each timed once; W0 and W1 stay in bf16 as a checkpoint holds them):
- exact:       full SVDs of W0 and W1, svdvals of Δ;
- randomized:  W0's and W1's top-k subspaces by torch.svd_lowrank, Δ's spectrum exact (the default above
               rlsubnet's size threshold);
- rand-all:    Δ's spectrum randomized too (the default above the Δ threshold; energy ranks that q up to 1024
               cannot reach are None).
With ``--small`` the exact SVDs also run in float64: that column is the float32 exact result's error.
svdvals(Δ) is also timed alone: it is most of the randomized run's time. Every time is given as wall-clock seconds
and, in brackets, the CPU seconds of the process: on a shared machine the wall clock counts the waits for a core,
the CPU seconds much less so (with --threads 1 they are what an idle core would take, less cache contention).
Errors are against the exact run: absolute for shares, degrees and ranks, relative for drift and
stable/effective rank. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from rlsubnet.diff.spectral import DEFAULT_TOP_K, METRICS, spectral_stats

BIG = 1 << 62  # a size threshold no matrix reaches
RELATIVE = {"stable_rank", "effective_rank", "spectral_drift"}


def llm_like_pair(m: int, n: int, seed: int, density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    w = torch.randn(m, n, generator=g) * std
    edge = std * (math.sqrt(m) + math.sqrt(n))
    spikes = 64
    sigma = 6 * edge * torch.arange(1, spikes + 1, dtype=torch.float32) ** -0.6
    a = torch.randn(m, spikes, generator=g)
    b = torch.randn(spikes, n, generator=g)
    a /= a.norm(dim=0)
    b /= b.norm(dim=1, keepdim=True)
    w += (a * sigma) @ b
    w0 = w.bfloat16()
    del w, a, b
    bits = w0.view(torch.int16).clone()
    move = torch.rand(m, n, generator=g) < density
    up = torch.rand(m, n, generator=g) < 0.5
    # +1 on the bit pattern grows the magnitude by one ULP, -1 shrinks it (never below zero: +0 has no -1)
    step = torch.where(up | ((bits & 0x7FFF) == 0), 1, -1).to(torch.int16)
    bits += torch.where(move, step, torch.zeros_like(step))
    return w0, bits.view(torch.bfloat16)


def error(key: str, got, ref) -> str:
    if got is None or ref is None:
        return "n/a" if got is None and ref is None else f"{got} vs {ref}"
    if key in RELATIVE:
        return f"{abs(got - ref) / abs(ref):.1e} rel" if ref else f"{abs(got - ref):.1e} abs"
    return f"{abs(got - ref):.2g}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="1024×1024 and 1024×2752 (default 4096×4096 and 4096×11008)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(1024, 1024), (1024, 2752)] if args.small else [(4096, 4096), (4096, 11008)]
    k = args.top_k
    print(f"top-k {k}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for m, n in shapes:
        w0, w1 = llm_like_pair(m, n, args.seed)
        delta = (w1 - w0).float()  # bf16 − bf16, exact for one-ULP moves
        variants = {
            "exact": {"exact_max_elements": BIG, "delta_exact_max_elements": BIG},
            "randomized": {"exact_max_elements": 0, "delta_exact_max_elements": BIG},
            "rand-all": {"exact_max_elements": 0, "delta_exact_max_elements": 0},
        }
        if args.small:
            variants["exact-fp64"] = {**variants["exact"], "svd_dtype": torch.float64}
        runs = {}
        for label, options in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            stats = spectral_stats(w0, w1, delta, k, **options)
            runs[label] = (stats, time.perf_counter() - t0, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        torch.linalg.svdvals(delta)
        svdvals_seconds = f"{time.perf_counter() - t0:.2f} ({time.process_time() - c0:.2f} CPU)"
        print(f"\n{m}×{n} bf16, {float((delta != 0).float().mean()):.1%} of entries moved by one ULP")
        print(
            "  seconds per matrix, wall (CPU): "
            + ", ".join(f"{name} {sec:.2f} ({cpu:.2f})" for name, (_, sec, cpu) in runs.items())
        )
        print(f"  of which svdvals(Δ) alone (exact, randomized, exact-fp64): {svdvals_seconds}")
        ref = runs["exact"][0].to_record()
        names = [name for name in runs if name != "exact"]
        print(f"  {'metric':30s} {'exact':>12s}  " + "  ".join(f"{'err ' + name:>16s}" for name in names))
        for key in METRICS:
            value = ref[key]
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            errs = "  ".join(f"{error(key, runs[name][0].to_record()[key], value):>16s}" for name in names)
            print(f"  {key:30s} {shown:>12s}  {errs}")


if __name__ == "__main__":
    main()
