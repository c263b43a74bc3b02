"""The streaming comparison engine: one base checkpoint against one or more tuned ones.

Tensors are visited in the base's storage order and read in flat blocks of ``block_bytes`` per side, so peak
memory is a few blocks (plus one fp32 copy of a matrix's Δ when ``rank=True``), whatever the model size.
A background thread reads the next blocks while the current ones are reduced: reading and arithmetic overlap.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet._threads import BufferRing, prefetch
from rlsubnet.checkpoint import Checkpoint, element_size, open_checkpoint
from rlsubnet.diff.names import is_norm, layer_of, module_kind
from rlsubnet.diff.pairs import align, require_parameters
from rlsubnet.diff.stats import COMPARE_DTYPES, DeltaAccumulator, single_threaded_torch
from rlsubnet.diff.summary import CompareResult
from rlsubnet.errors import UsageError

DEFAULT_ATOLS = (0.0, 1e-5)
DEFAULT_BLOCK_BYTES = 16 << 20


def normalise_atols(atol: float | Sequence[float]) -> tuple[float, ...]:
    """The distinct tolerances, sorted, each checked (finite, non-negative) and with −0.0 read as 0."""
    atols = (atol,) if isinstance(atol, numbers.Real) else tuple(atol)
    if not atols:
        raise UsageError("give at least one atol")
    out = sorted({limits.atol(a) for a in atols})
    if len(out) > limits.MAX_ATOLS:
        raise UsageError(f"at most {limits.MAX_ATOLS} distinct atols, got {len(out)}")
    return tuple(out)


@dataclass
class _Job:
    name: str
    accumulators: list[tuple[int, DeltaAccumulator]]  # (index of tuned checkpoint, accumulator)


def compare_many(
    base,
    tuned: Sequence,
    *,
    atol: float | Sequence[float] = DEFAULT_ATOLS,
    dtype: str = "bf16",
    rank: bool = False,
    allow_mismatch: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
    progress: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> list[CompareResult]:
    """Compare each of ``tuned`` against ``base``, reading every base tensor once.

    ``base`` and each entry of ``tuned`` may be a path, a hub id, a state dict, a module or a Checkpoint.
    """
    if dtype not in COMPARE_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r} (choose from {', '.join(COMPARE_DTYPES)})")
    atols = normalise_atols(atol)
    block_bytes = limits.block_bytes(block_bytes)
    if not tuned:
        raise UsageError("give at least one tuned checkpoint")
    opened: list[Checkpoint] = []
    try:
        opts = {"allow_pickle": allow_pickle, "allow_download": allow_download}
        base_ck = open_checkpoint(base, **opts, label="base")
        opened.append(base_ck)
        tuned_cks = []
        for i, t in enumerate(tuned):
            ck = open_checkpoint(t, **opts, label=f"tuned[{i}]")
            opened.append(ck)
            tuned_cks.append(ck)

        plans = []
        for ck in tuned_cks:
            names, skipped = align(
                base_ck.infos, ck.infos, allow_mismatch=allow_mismatch, base_label=base_ck.location, tuned_label=ck.location
            )
            require_parameters(base_ck.infos, ck.infos, names, base_label=base_ck.location, tuned_label=ck.location)
            plans.append((set(names), skipped))

        jobs: list[_Job] = []
        for name in base_ck.names():
            binfo = base_ck.infos[name]
            accs = []
            for i, ck in enumerate(tuned_cks):
                if name in plans[i][0]:
                    tinfo = ck.infos[name]
                    acc = DeltaAccumulator(
                        name, binfo.shape, binfo.dtype, tinfo.dtype, atols, dtype, rank=rank and not is_norm(name)
                    )
                    accs.append((i, acc))
            if accs:
                jobs.append(_Job(name, accs))

        per_tuned_stats: list[list] = [[] for _ in tuned_cks]
        total = sum(
            base_ck.infos[j.name].numel * element_size(base_ck.infos[j.name].dtype) * (1 + len(j.accumulators))
            for j in jobs
        )

        # One buffer per checkpoint per block in flight: one being reduced, one queued, one being read.
        n_sides = 1 + len(tuned_cks)
        ring = BufferRing(3, lambda: [np.empty(block_bytes, dtype=np.uint8) for _ in range(n_sides)])

        def read_block(ck: Checkpoint, name: str, start: int, stop: int, buf: np.ndarray) -> torch.Tensor:
            dtype = ck.infos[name].dtype
            if stop - start == 0 or element_size(dtype) > block_bytes:
                return ck.read_flat(name, start, stop)
            return torch.from_numpy(np.asarray(ck.read_flat_into(name, start, stop, buf))).view(dtype)

        def blocks():
            for job in jobs:
                info = base_ck.infos[job.name]
                itemsize = max(element_size(info.dtype), *(element_size(tuned_cks[i].infos[job.name].dtype) for i, _ in job.accumulators))
                block = max(1, block_bytes // itemsize)
                for start in range(0, info.numel, block) if info.numel else [0]:
                    stop = min(info.numel, start + block)
                    bufs = ring.get()
                    b = read_block(base_ck, job.name, start, stop, bufs[0])
                    ts = [read_block(tuned_cks[i], job.name, start, stop, bufs[1 + k]) for k, (i, _) in enumerate(job.accumulators)]
                    yield job, b, ts, stop == info.numel, bufs

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="compare", delay=1.0, leave=False)
        try:
            for job, b, ts, last, bufs in prefetch(blocks(), depth=1):
                with single_threaded_torch():
                    for (_, acc), t in zip(job.accumulators, ts):
                        acc.update(b, t)
                nbytes = b.numel() * b.element_size() + sum(t.numel() * t.element_size() for t in ts)
                del b, ts  # views of bufs: drop them before the buffers go back to the reader
                ring.put(bufs)
                if last:  # outside single_threaded_torch: the rank's SVD wants every core
                    for i, acc in job.accumulators:
                        stats = acc.finish()
                        stats.layer, stats.module = layer_of(job.name), module_kind(job.name)
                        per_tuned_stats[i].append(stats)
                if bar is not None:
                    bar.update(nbytes)
        finally:
            ring.close()
            if bar is not None:
                bar.close()

        options = {"allow_mismatch": allow_mismatch}
        return [
            CompareResult(
                base=base_ck.source,
                tuned=ck.source,
                atols=atols,
                dtype=dtype,
                tensors=per_tuned_stats[i],
                skipped=plans[i][1],
                rank=rank,
                options=options,
            )
            for i, ck in enumerate(tuned_cks)
        ]
    finally:
        for ck in opened:  # close what we opened, not Checkpoints the caller passed in
            if not any(ck is spec for spec in (base, *tuned)):
                ck.close()


def compare(base, tuned, *, atol: float | Sequence[float] = DEFAULT_ATOLS, dtype: str = "bf16", rank: bool = False, **kw) -> CompareResult:
    """Measure how ``tuned`` differs from ``base``: sparsity at each atol, groupings and (optionally) update rank.

    >>> r = rlsubnet.compare("base/", "grpo/", atol=(0, 1e-5))
    >>> r.sparsity(1e-5), r.to_json()["global"]
    """
    return compare_many(base, [tuned], atol=atol, dtype=dtype, rank=rank, **kw)[0]
