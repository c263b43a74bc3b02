"""Overlap of subnetworks, against two chance baselines.

For masks A and B over the same n parameters:

- o1 = |A∩B| / |A|, o2 = |A∩B| / |B|, Jaccard = |A∩B| / |A∪B|.
- **Density chance** (the paper's): if A and B were independent, o1 = density(B) and o2 = density(A);
  the expected intersection is n·d_A·d_B, which also gives a chance Jaccard.
- **Magnitude-matched chance**: if each parameter's chance of being in a mask depended only on the bucket of
  its |w| in the base, with p_A,b = |A ∩ bucket b| / n_b estimated from the masks themselves, the expected
  intersection is Σ_b n_b·p_A,b·p_B,b, so chance o1 = that / |A|, chance o2 = that / |B|. Overlap above the
  density chance but at the magnitude-matched chance is explained by weight magnitude (bf16 rounding decides
  which weights can change at all), not by a shared subnetwork.

Buckets are log-spaced on |w| (the base value upcast to float32): ``bins_per_octave`` buckets per power of two.
With the default 1, a bucket is [2^(e−1), 2^e): exactly the weights sharing one bf16 exponent, hence one bf16
ULP, the quantity that decides whether an update survives rounding. Zeros and non-finite values get their own
buckets. Per-layer and per-module rows estimate p within the group (so one bucket reduces to the density
baseline), so a group row answers "is the overlap inside this group explained by magnitude inside this group".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from rlsubnet import limits
from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.hashing import HASH_SCHEME
from rlsubnet.checkpoint.stream import BLOCK_BYTES, BlockStream, Item, block_numel
from rlsubnet.diff.names import grouped, layer_of, module_kind
from rlsubnet.errors import MismatchError, UsageError
from rlsubnet.masks.build import checkpoint_record
from rlsubnet.masks.errors import MaskMismatchError
from rlsubnet.masks.io import popcount
from rlsubnet.masks.mask import Mask

# Entries per block of the base: bucket_index widens each to float32 bits and int64 bucket codes, so a block is
# as many entries as a float32 block holds (a multiple of 8: mask bits are unpacked from whole bytes).
BUCKET_BLOCK_NUMEL = block_numel(BLOCK_BYTES, 4, 8)

ZERO_BUCKET, NONFINITE_BUCKET, SUBNORMAL_BUCKET, FIRST_BUCKET = 0, 1, 2, 3
N_EXPONENTS = 254  # float32 biased exponents 1..254 (normal numbers)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pair_figures(n: int, count_a: int, count_b: int, inter: float, expected_mm: float | None = None) -> dict:
    """o1, o2, Jaccard and the chance baselines from counts (``inter`` observed |A∩B|)."""
    union = count_a + count_b - inter
    d_a = count_a / n if n else 0.0
    d_b = count_b / n if n else 0.0
    exp_density = n * d_a * d_b
    out = {
        "numel": n,
        "count_a": count_a,
        "count_b": count_b,
        "intersection": int(inter),
        "density_a": d_a,
        "density_b": d_b,
        "o1": _ratio(inter, count_a),
        "o2": _ratio(inter, count_b),
        "jaccard": _ratio(inter, union),
        "chance_o1": d_b,
        "chance_o2": d_a,
        "chance_jaccard": _ratio(exp_density, count_a + count_b - exp_density),
    }
    if expected_mm is not None:
        out["expected_intersection_magnitude"] = expected_mm
        out["magnitude_chance_o1"] = _ratio(expected_mm, count_a)
        out["magnitude_chance_o2"] = _ratio(expected_mm, count_b)
        out["magnitude_chance_jaccard"] = _ratio(expected_mm, count_a + count_b - expected_mm)
    return out


@lru_cache(maxsize=16)
def _sub_thresholds(bins_per_octave: int) -> np.ndarray:
    # Mantissa m = 1 + frac / 2^23 is >= 2^(j/k) iff frac >= ceil((2^(j/k) - 1) * 2^23) (2^(j/k) is irrational).
    return np.array(
        [math.ceil((2.0 ** (j / bins_per_octave) - 1.0) * (1 << 23)) for j in range(1, bins_per_octave)], dtype=np.int32
    )


def bucket_index(w: torch.Tensor, bins_per_octave: int = 1) -> np.ndarray:
    """Bucket of each |w| (int64 numpy array), computed exactly from the float32 bit pattern.

    0: zero; 1: NaN or ±Inf; 2: float32 subnormals (0 < |w| < 2^-126); then, for a normal |w| with biased
    exponent E (|w| in [2^(E-127), 2^(E-126))), ``FIRST_BUCKET + (E - 1) * k + j`` where j counts the
    boundaries 2^(E-127+i/k), i = 1..k-1, at or below |w| (k = ``bins_per_octave``).
    """
    x = w.reshape(-1)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)  # exact for bf16 / fp16 / ints up to 2^24; float64 rounds to the nearest float32
    bits = x.contiguous().view(torch.int32).numpy()
    exp = (bits >> 23) & 0xFF
    idx = exp.astype(np.int64)
    if bins_per_octave > 1:
        idx = (idx - 1) * bins_per_octave + FIRST_BUCKET
        frac = bits & 0x7FFFFF
        idx += np.searchsorted(_sub_thresholds(bins_per_octave), frac, side="right")
    else:
        idx += FIRST_BUCKET - 1
    special = (exp == 0) | (exp == 0xFF)
    if special.any():
        frac = bits & 0x7FFFFF
        idx[(exp == 0) & (frac == 0)] = ZERO_BUCKET
        idx[(exp == 0) & (frac != 0)] = SUBNORMAL_BUCKET
        idx[exp == 0xFF] = NONFINITE_BUCKET
    return idx


def n_buckets(bins_per_octave: int) -> int:
    return FIRST_BUCKET + N_EXPONENTS * bins_per_octave


def bucket_bounds(i: int, bins_per_octave: int) -> tuple[float | None, float | None, str]:
    """[lo, hi) of |w| for bucket ``i`` and a label."""
    if i == ZERO_BUCKET:
        return 0.0, 0.0, "0"
    if i == NONFINITE_BUCKET:
        return None, None, "nan/inf"
    if i == SUBNORMAL_BUCKET:
        return 0.0, 2.0**-126, "subnormal"
    e, j = divmod(i - FIRST_BUCKET, bins_per_octave)
    lo = 2.0 ** (e + 1 - 127 + j / bins_per_octave)
    hi = 2.0 ** (e + 1 - 127 + (j + 1) / bins_per_octave)
    return lo, hi, f"[{lo:.3g}, {hi:.3g})"


@dataclass
class _TensorCounts:
    name: str
    numel: int
    counts: list[int]  # |M_i ∩ tensor| per mask
    inter: dict[tuple[int, int], int]  # |M_i ∩ M_j ∩ tensor|
    buckets: np.ndarray | None = None  # n per bucket
    bucket_counts: np.ndarray | None = None  # [mask, bucket]
    bucket_inter: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


@dataclass
class PairOverlap:
    """Overlap of masks ``a`` and ``b`` (labels as given), with per-layer, per-module and per-bucket rows."""

    a: str
    b: str
    figures: dict
    layers: list[dict]
    modules: list[dict]
    buckets: list[dict] | None = None

    def __getattr__(self, key):
        fig = self.__dict__.get("figures", {})
        if key in fig:
            return fig[key]
        raise AttributeError(key)

    def to_json(self) -> dict:
        out = {"a": self.a, "b": self.b, **self.figures, "layers": self.layers, "modules": self.modules}
        if self.buckets is not None:
            out["buckets"] = self.buckets
        return out


@dataclass
class OverlapResult:
    """All pairs of several masks, plus the o1 matrix (row A, column B: |A∩B| / |A|)."""

    labels: list[str]
    pairs: list[PairOverlap]
    densities: list[float]
    matrix_o1: list[list[float | None]]
    matrix_chance_o1: list[list[float | None]]
    matrix_magnitude_chance_o1: list[list[float | None]] | None
    settings: dict
    warnings: list[str] = field(default_factory=list)

    def pair(self, a: str, b: str) -> PairOverlap:
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
        raise KeyError((a, b))

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "masks": [{"label": label, "density": d} for label, d in zip(self.labels, self.densities)],
            "pairs": [p.to_json() for p in self.pairs],
            "matrix": {
                "rows_are": "A",
                "cols_are": "B",
                "o1": self.matrix_o1,
                "chance_o1": self.matrix_chance_o1,
                "magnitude_chance_o1": self.matrix_magnitude_chance_o1,
            },
            "warnings": self.warnings,
        }


def _row(counts: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if counts is None else counts[i]


def _summed(arrays: Iterable[np.ndarray | None]) -> np.ndarray:
    """Sum of per-tensor bucket counts, which :func:`_bucket_counts` fills in for every tensor."""
    total: np.ndarray | None = None
    for a in arrays:
        if a is None:
            raise ValueError("bucket counts are missing: the base was not streamed")
        total = a.copy() if total is None else total + a
    if total is None:
        raise ValueError("no tensors to sum bucket counts over")
    return total


def _expected_mm(n_b: np.ndarray, a_b: np.ndarray, b_b: np.ndarray) -> float:
    nz = n_b > 0
    return float(np.sum(a_b[nz].astype(np.float64) * b_b[nz].astype(np.float64) / n_b[nz]))


def _group_rows(tcs: list[_TensorCounts], i: int, j: int, key, with_mm: bool, label: str) -> list[dict]:
    rows = []
    for g, members in grouped(tcs, lambda tc: key(tc.name), label):
        n = sum(t.numel for t in members)
        ca = sum(t.counts[i] for t in members)
        cb = sum(t.counts[j] for t in members)
        inter = sum(t.inter[(i, j)] for t in members)
        mm = None
        if with_mm:
            n_b = _summed(t.buckets for t in members)
            a_b = _summed(_row(t.bucket_counts, i) for t in members)
            b_b = _summed(_row(t.bucket_counts, j) for t in members)
            mm = _expected_mm(n_b, a_b, b_b)
        rows.append({label: g, "n_tensors": len(members), **pair_figures(n, ca, cb, inter, mm)})
    return rows


def overlap_many(
    masks: Sequence[Mask],
    labels: Sequence[str] | None = None,
    *,
    base=None,
    bins_per_octave: int = 1,
    allow_pickle: bool = False,
    allow_download: bool = False,
    progress: bool = False,
) -> OverlapResult:
    """Every pair of ``masks`` (i < j), and the o1 matrix; with ``base`` also the magnitude-matched chance.

    ``base`` is the checkpoint the masks were measured from (anything :func:`rlsubnet.open_checkpoint` opens); it is
    streamed once, one tensor at a time, whatever the number of masks.
    """
    masks = list(masks)
    if len(masks) < 2:
        raise UsageError("overlap needs at least two masks")
    labels = list(labels) if labels is not None else [m.meta.get("path") or f"mask{i}" for i, m in enumerate(masks)]
    if len(labels) != len(masks):
        raise UsageError("one label per mask")
    bins_per_octave = limits.integer(bins_per_octave, "bins_per_octave", 1, limits.MAX_BINS_PER_OCTAVE)
    for lab, m in zip(labels[1:], masks[1:]):
        try:
            masks[0].check_same_layout(m, "compare")
        except MismatchError as exc:
            raise type(exc)(f"{labels[0]} vs {lab}: {exc}") from None
    if masks[0].numel == 0:  # 0 of 0 entries would be reported as overlaps of a measured subnetwork
        raise UsageError(
            f"{', '.join(map(str, labels))}: the masks cover no parameters "
            f"({len(masks[0])} tensors, all empty): nothing to overlap"
        )
    warnings: list[str] = []
    for key in ("atol", "dtype"):
        values = {repr(m.meta.get(key)) for m in masks}
        if len(values) > 1:
            warnings.append(
                f"masks were built with different {key}: "
                + ", ".join(f"{lab}={m.meta.get(key)!r}" for lab, m in zip(labels, masks))
            )
    for lab, m in zip(labels, masks):
        if m.changed == 0:
            warnings.append(f"{lab} is empty (density 0): its overlaps are undefined (reported as null)")
        elif m.changed == m.numel:
            warnings.append(f"{lab} holds every parameter (density 1): any mask lies inside it")
    pairs_idx = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    names = masks[0].names()
    nb = n_buckets(bins_per_octave)

    tcs: list[_TensorCounts] = []
    for name in names:
        numel = math.prod(masks[0].shape(name))
        inter = {}
        for i, j in pairs_idx:
            inter[(i, j)] = popcount(np.bitwise_and(masks[i].packed(name), masks[j].packed(name)))
        tcs.append(_TensorCounts(name, numel, [m.count(name) for m in masks], inter))

    base_info = None
    if base is not None:
        base_info = _bucket_counts(
            tcs,
            masks,
            pairs_idx,
            base,
            bins_per_octave,
            nb,
            warnings,
            allow_pickle=allow_pickle,
            allow_download=allow_download,
            progress=progress,
        )

    with_mm = base is not None
    n_total = sum(t.numel for t in tcs)
    pairs: list[PairOverlap] = []
    for i, j in pairs_idx:
        n_inter = sum(t.inter[(i, j)] for t in tcs)
        mm = None
        bucket_rows = None
        if with_mm:
            n_b = _summed(t.buckets for t in tcs)
            a_b = _summed(_row(t.bucket_counts, i) for t in tcs)
            b_b = _summed(_row(t.bucket_counts, j) for t in tcs)
            ab_b = _summed(t.bucket_inter[(i, j)] for t in tcs)
            mm = _expected_mm(n_b, a_b, b_b)
            bucket_rows = []
            for k in np.nonzero(n_b)[0]:
                lo, hi, lab = bucket_bounds(int(k), bins_per_octave)
                n_k = int(n_b[k])
                bucket_rows.append(
                    {
                        "bucket": lab,
                        "abs_w_lo": lo,
                        "abs_w_hi": hi,
                        "numel": n_k,
                        "density_a": int(a_b[k]) / n_k,
                        "density_b": int(b_b[k]) / n_k,
                        "intersection": int(ab_b[k]),
                        "expected_intersection": float(a_b[k]) * float(b_b[k]) / n_k,
                    }
                )
        figures = pair_figures(n_total, sum(t.counts[i] for t in tcs), sum(t.counts[j] for t in tcs), n_inter, mm)
        pairs.append(
            PairOverlap(
                labels[i],
                labels[j],
                figures,
                _group_rows(tcs, i, j, layer_of, with_mm, "layer"),
                _group_rows(tcs, i, j, module_kind, with_mm, "module"),
                bucket_rows,
            )
        )

    n_masks = len(masks)
    dens = [mk.density for mk in masks]
    mat: list[list[float | None]] = [[1.0 if mk.changed else None for _ in range(n_masks)] for mk in masks]
    chance: list[list[float | None]] = [[None] * n_masks for _ in range(n_masks)]
    mm_mat: list[list[float | None]] | None = [[None] * n_masks for _ in range(n_masks)] if with_mm else None
    for r in range(n_masks):
        chance[r][r] = 1.0 if masks[r].changed else None
        if mm_mat is not None:
            mm_mat[r][r] = 1.0 if masks[r].changed else None
    for p, (i, j) in zip(pairs, pairs_idx):
        f = p.figures
        mat[i][j], mat[j][i] = f["o1"], f["o2"]
        chance[i][j], chance[j][i] = f["chance_o1"], f["chance_o2"]
        if mm_mat is not None:
            mm_mat[i][j], mm_mat[j][i] = f["magnitude_chance_o1"], f["magnitude_chance_o2"]
    settings = {
        "masks": [
            {"label": lab, **mk.describe(("kind", "atol", "dtype", "density", "base", "tuned"))}
            for lab, mk in zip(labels, masks)
        ],
        "base": base_info,
        "buckets": (
            f"log2 of |w| in the base (float32), {bins_per_octave} per octave"
            + (" (= one bf16 exponent, one bf16 ULP, per bucket)" if bins_per_octave == 1 else "")
            + "; zeros and non-finite values in their own buckets"
        )
        if with_mm
        else None,
        "bins_per_octave": bins_per_octave if with_mm else None,
        "group_magnitude_chance": "bucket probabilities estimated within each layer / module group",
    }
    return OverlapResult(labels, pairs, dens, mat, chance, mm_mat, settings, warnings)


def overlap(
    a: Mask, b: Mask, *, base=None, bins_per_octave: int = 1, labels: Sequence[str] = ("a", "b"), **kw
) -> PairOverlap:
    """Overlap of two masks (see the module docstring); ``base`` adds the magnitude-matched chance."""
    return overlap_many([a, b], list(labels), base=base, bins_per_octave=bins_per_octave, **kw).pairs[0]


def _bucket_counts(
    tcs, masks, pairs_idx, base, bins_per_octave, nb, warnings, *, allow_pickle, allow_download, progress
) -> dict:
    """Stream the base once: per tensor, n per bucket, |M ∩ bucket| per mask and |Mi ∩ Mj ∩ bucket| per pair."""
    ck = open_checkpoint(base, allow_pickle=allow_pickle, allow_download=allow_download, label="base")
    try:
        diff = layout_diff(
            {t.name: masks[0].shape(t.name) for t in tcs},
            {n: i.shape for n, i in ck.infos.items()},
            detail=lambda n, a, b: f"{n} {list(b)} vs {list(a)}",
        )
        diff.extra = []  # base tensors no mask covers are fine: a mask may leave tensors out
        if diff:
            raise MaskMismatchError(
                f"{ck.location} does not match the masks ({diff.describe('mask tensors missing from the base', '')})"
            )
        # only hashes of this scheme compare (masks written before the switch to XXH3 hold SHA-256 ones)
        recorded = {
            (m.meta.get("base") or {}).get("content_hash")
            for m in masks
            if (m.meta.get("base") or {}).get("content_hash_scheme") == HASH_SCHEME
        } - {None}
        want_hash = bool(recorded)
        hashes: dict[str, str] = {}
        items = [Item(t.name, t.numel, BUCKET_BLOCK_NUMEL, hash=(0,) if want_hash else (), tag=t) for t in tcs]

        for t in tcs:
            t.buckets = np.zeros(nb, dtype=np.int64)
            t.bucket_counts = np.zeros((len(masks), nb), dtype=np.int64)
            t.bucket_inter = {p: np.zeros(nb, dtype=np.int64) for p in pairs_idx}
        m = len(masks)
        # With few masks, one bincount per block over (bucket, membership pattern) gives every per-mask and
        # per-pair count at once; with many, count per mask and per pair.
        by_pattern = m <= 8
        if by_pattern:
            patterns = np.arange(1 << m)
            sel = [np.nonzero((patterns >> i) & 1)[0] for i in range(m)]
            sel_pair = {(i, j): np.nonzero(((patterns >> i) & 1) & ((patterns >> j) & 1))[0] for i, j in pairs_idx}
        stream = BlockStream([ck], items, progress="base" if progress else None)
        with stream as blocks:
            for block in blocks:
                t, start, stop = block.item.tag, block.start, block.stop
                if block.last and want_hash:
                    hashes[t.name] = block.digests[0]
                if stop == start:  # an empty tensor: nothing to count
                    stream.release(block)
                    continue
                (w,) = block.tensors()
                idx = bucket_index(w, bins_per_octave)  # a new array: the block's buffer can go back
                del w
                stream.release(block)
                flags = [mk.flat_block(t.name, start, stop) for mk in masks]
                if by_pattern:
                    pattern = flags[0].view(np.uint8).copy()
                    for i in range(1, m):
                        pattern |= flags[i].view(np.uint8) << i
                    code = (idx << m) | pattern
                    hist = np.bincount(code, minlength=nb << m).reshape(nb, 1 << m)
                    t.buckets += hist.sum(axis=1)
                    for i in range(m):
                        t.bucket_counts[i] += hist[:, sel[i]].sum(axis=1)
                    for pair in pairs_idx:
                        t.bucket_inter[pair] += hist[:, sel_pair[pair]].sum(axis=1)
                else:
                    t.buckets += np.bincount(idx, minlength=nb)
                    for mi, f in enumerate(flags):
                        t.bucket_counts[mi] += np.bincount(idx[f], minlength=nb)
                    for i, j in pairs_idx:
                        t.bucket_inter[(i, j)] += np.bincount(idx[flags[i] & flags[j]], minlength=nb)
        ident = checkpoint_record(ck, hashes if want_hash else None)
        for m in masks:
            rec = m.meta.get("base") or {}
            if rec.get("layout_sha256") and rec["layout_sha256"] != ident["layout_sha256"]:
                warnings.append(
                    f"--base {ck.source} has a different layout (names, dtypes, shapes) from the base "
                    f"{rec.get('source')!r} recorded in mask {m.meta.get('path') or m.kind}"
                )
            if (
                rec.get("content_hash")
                and ident.get("content_hash")
                and rec.get("content_hash_scheme") == ident.get("content_hash_scheme")
                and rec.get("content_scope") == ident.get("content_scope")
                and rec["content_hash"] != ident["content_hash"]
            ):
                warnings.append(
                    f"--base {ck.source} holds different weights from the base {rec.get('source')!r} recorded in "
                    f"mask {m.meta.get('path') or m.kind} (content hashes differ)"
                )
        return ident
    finally:
        if ck is not base:
            ck.close()
