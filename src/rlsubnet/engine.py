"""The streaming comparison engine: one base checkpoint against one or more tuned ones.

Tensors are visited in the base's storage order and read in flat blocks of ``block_bytes`` per side, so peak
memory is a few blocks (plus one fp32 copy of a matrix's Δ when ``rank=True``; with ``spectral=True``, the
matrix of each side and the factors of its SVDs), whatever the model size.
A background thread reads the next blocks while the current ones are reduced: reading and arithmetic overlap.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence

from rlsubnet import limits
from rlsubnet._threads import single_threaded_torch
from rlsubnet.checkpoint import Checkpoint, element_size, open_checkpoint
from rlsubnet.checkpoint.align import align, require_parameters
from rlsubnet.checkpoint.stream import BLOCK_BYTES, BlockStream, Item, block_numel
from rlsubnet.diff.changed import legacy_mode
from rlsubnet.diff.names import is_norm, layer_of, module_kind
from rlsubnet.diff.spectral import DEFAULT_TOP_K, check_top_k
from rlsubnet.diff.spectral_stream import SpectralCollector, SpectralSummary, wants_spectral
from rlsubnet.diff.stats import DeltaAccumulator
from rlsubnet.diff.summary import CompareResult
from rlsubnet.errors import UsageError

DEFAULT_ATOLS = (0.0, 1e-5)


def normalise_atols(atol: float | Sequence[float]) -> tuple[float, ...]:
    """The distinct tolerances, sorted, each checked (finite, non-negative) and with −0.0 read as 0."""
    # float named for the type checker; numbers.Real also takes ints and numpy scalars
    atols = (atol,) if isinstance(atol, (float, numbers.Real)) else tuple(atol)
    if not atols:
        raise UsageError("give at least one atol")
    out = sorted({limits.atol(a) for a in atols})
    if len(out) > limits.MAX_ATOLS:
        raise UsageError(f"at most {limits.MAX_ATOLS} distinct atols, got {len(out)}")
    return tuple(out)


def compare_many(
    base,
    tuned: Sequence,
    *,
    atol: float | Sequence[float] = DEFAULT_ATOLS,
    mode: str = "bf16",
    rank: bool = False,
    spectral: bool = False,
    top_k: int | None = None,
    allow_mismatch: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
    progress: bool = False,
    block_bytes: int = BLOCK_BYTES,
    **legacy,
) -> list[CompareResult]:
    """Compare each of ``tuned`` against ``base``, reading every base tensor once.

    ``base`` and each entry of ``tuned`` may be a path, a hub id, a state dict, a module or a Checkpoint.
    ``mode``: the comparison mode, one of :data:`rlsubnet.diff.changed.COMPARE_MODES`.
    ``spectral``: also the spectral metrics of every 2-D non-norm matrix (:mod:`rlsubnet.diff.spectral`) against
    W0's top ``top_k`` singular directions (default :data:`~rlsubnet.diff.spectral.DEFAULT_TOP_K`), in each
    result's ``spectral``.
    """
    mode = legacy_mode(mode, legacy)
    atols = normalise_atols(atol)
    if top_k is not None and not spectral:
        raise UsageError("--top-k needs --spectral")
    k = DEFAULT_TOP_K if top_k is None else top_k
    if spectral:
        check_top_k(k, (sys.maxsize, sys.maxsize))  # a positive integer; each matrix's bound is checked below
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
                base_ck.infos,
                ck.infos,
                allow_mismatch=allow_mismatch,
                base_label=base_ck.location,
                tuned_label=ck.location,
            )
            require_parameters(base_ck.infos, ck.infos, names, base_label=base_ck.location, tuned_label=ck.location)
            plans.append((set(names), skipped))

        # One item per base tensor, read from the base (side 0) and every tuned checkpoint holding it (side 1 + i);
        # its tag: (index of the tuned checkpoint, accumulator) per tuned side.
        items = []
        collectors: dict[str, SpectralCollector] = {}
        for name in base_ck.names():
            binfo = base_ck.infos[name]
            accs = [
                (
                    i,
                    DeltaAccumulator(
                        name,
                        binfo.shape,
                        binfo.dtype,
                        ck.infos[name].dtype,
                        atols,
                        mode,
                        rank=rank and not is_norm(name),
                    ),
                )
                for i, ck in enumerate(tuned_cks)
                if name in plans[i][0]
            ]
            measured = [(i, acc) for i, acc in accs if spectral and wants_spectral(name, binfo.shape, acc.is_float)]
            if measured:
                # checked here, before anything is read: a --top-k too large for one matrix stops the run at once
                collectors[name] = SpectralCollector(
                    name,
                    binfo.shape,
                    binfo.dtype,
                    [(i, tuned_cks[i].infos[name].dtype, acc.cmp_dtype) for i, acc in measured],
                    k,
                )
                for _, acc in measured:
                    acc.want_rank = False  # the spectral pass ranks it from the same singular values
            if accs:
                sides = (0, *(1 + i for i, _ in accs))
                itemsize = max(element_size(([base_ck] + tuned_cks)[s].infos[name].dtype) for s in sides)
                items.append(Item(name, binfo.numel, block_numel(block_bytes, itemsize), read=sides, tag=accs))

        per_tuned_stats: list[list] = [[] for _ in tuned_cks]
        per_tuned_spectral = [SpectralSummary(k) for _ in tuned_cks]
        stream = BlockStream([base_ck, *tuned_cks], items, progress="compare" if progress else None)
        with stream as blocks:
            for block in blocks:
                b, *ts = block.tensors()
                col = collectors.get(block.item.name)
                with single_threaded_torch():
                    for (_, acc), t in zip(block.item.tag, ts):
                        acc.update(b, t)
                    if col is not None:
                        by_side = dict(zip((i for i, _ in block.item.tag), ts))
                        col.update(block.start, b, [by_side[side.index] for side in col.sides])
                        del by_side
                del b, ts  # views of the block's buffers: drop them before the buffers go back to the reader
                stream.release(block)
                if block.last:  # outside single_threaded_torch: the rank's SVD wants every core
                    finished = {}
                    for i, acc in block.item.tag:
                        stats = acc.finish()
                        stats.layer, stats.module = layer_of(block.item.name), module_kind(block.item.name)
                        per_tuned_stats[i].append(stats)
                        finished[i] = stats
                    if col is not None:
                        del collectors[block.item.name]
                        for i, spec, ranked in col.finish(rank=rank):
                            per_tuned_spectral[i].matrices.append(spec)
                            if ranked is not None:
                                finished[i].rank, finished[i].rank_ratio = ranked

        options: dict = {"allow_mismatch": allow_mismatch}
        if spectral:
            options.update(spectral=True, top_k=k)
        return [
            CompareResult(
                base=base_ck.source,
                tuned=ck.source,
                atols=atols,
                mode=mode,
                tensors=per_tuned_stats[i],
                skipped=plans[i][1],
                rank=rank,
                options=options,
                spectral=per_tuned_spectral[i] if spectral else None,
            )
            for i, ck in enumerate(tuned_cks)
        ]
    finally:
        for ck in opened:  # close what we opened, not Checkpoints the caller passed in
            if not any(ck is spec for spec in (base, *tuned)):
                ck.close()


def compare(
    base, tuned, *, atol: float | Sequence[float] = DEFAULT_ATOLS, mode: str = "bf16", rank: bool = False, **kw
) -> CompareResult:
    """Measure how ``tuned`` differs from ``base``: sparsity at each atol, groupings and (optionally) update rank
    and, with ``spectral=True`` (and ``top_k``), the spectral metrics of every update matrix.

    >>> r = rlsubnet.compare("base/", "grpo/", atol=(0, 1e-5), mode="bf16")
    >>> r.sparsity(1e-5), r.to_json()["global"]
    >>> r = rlsubnet.compare("base/", "grpo/", spectral=True, top_k=16)
    >>> r.spectral.overall()["principal_energy"], r.spectral.layers(), r.spectral.matrices[0].principal_angle_left
    """
    return compare_many(base, [tuned], atol=atol, mode=mode, rank=rank, **kw)[0]
