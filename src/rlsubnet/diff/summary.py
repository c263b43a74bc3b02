"""Pool per-tensor statistics into global, per-layer and per-module figures, and the result object."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from rlsubnet._version import __version__
from rlsubnet.checkpoint.align import Skipped
from rlsubnet.diff.names import MODULE_KINDS, grouped
from rlsubnet.diff.spectral_stream import SpectralSummary
from rlsubnet.diff.stats import TensorStats, atol_record


def _pool(stats: list[TensorStats], atols: tuple[float, ...]) -> list[dict]:
    """Numel-weighted figures per atol, plus the unweighted mean sparsity over the group's 2-D matrices."""
    numel = sum(s.numel for s in stats)
    matrices = [s for s in stats if len(s.shape) == 2 and s.numel]
    out = []
    for i, atol in enumerate(atols):
        rec = atol_record(atol, numel, sum(s.changed[i] for s in stats))
        rec["mean_matrix_sparsity"] = (
            sum(1 - s.changed[i] / s.numel for s in matrices) / len(matrices) if matrices else None
        )
        out.append(rec)
    return out


def _group(stats: list[TensorStats], atols: tuple[float, ...], by: str) -> list[dict]:
    return [
        {by: k, "n_tensors": len(v), "numel": sum(s.numel for s in v), "by_atol": _pool(v, atols)}
        for k, v in grouped(stats, lambda s: getattr(s, by), by)
    ]


@dataclass
class CompareResult:
    """One tuned checkpoint measured against a base. Every figure in every output comes from here."""

    base: str
    tuned: str
    atols: tuple[float, ...]
    mode: str  # the comparison mode (written under the key "dtype" in outputs, as files always had it)
    tensors: list[TensorStats]
    skipped: list[Skipped] = field(default_factory=list)
    rank: bool = False
    options: dict = field(default_factory=dict)
    spectral: SpectralSummary | None = None  # with compare(..., spectral=True)

    # -- headline figures
    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.tensors)

    def changed(self, atol: float = 1e-5) -> int:
        i = self._atol_index(atol)
        return sum(s.changed[i] for s in self.tensors)

    def density(self, atol: float = 1e-5) -> float:
        return self.changed(atol) / self.numel if self.numel else 0.0

    def sparsity(self, atol: float = 1e-5) -> float:
        return 1.0 - self.density(atol)

    def _atol_index(self, atol: float) -> int:
        for i, a in enumerate(self.atols):
            if a == atol:
                return i
        raise KeyError(f"atol {atol} was not measured (measured: {', '.join(map(repr, self.atols))})")

    @property
    def global_stats(self) -> list[dict]:
        return [
            {k: v for k, v in rec.items() if k != "mean_matrix_sparsity"} for rec in _pool(self.tensors, self.atols)
        ]

    @property
    def hidden_by_atol(self) -> int:
        """Entries with Δ ≠ 0 that the largest atol counts as unchanged."""
        return sum(s.hidden for s in self.tensors)

    @property
    def nonfinite(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for s in self.tensors:
            for k, v in s.nonfinite.items():
                total[k] += v
        return dict(total)

    @property
    def mean_matrix_sparsity(self) -> list[dict]:
        return [
            {"atol": r["atol"], "mean_matrix_sparsity": r["mean_matrix_sparsity"]}
            for r in _pool(self.tensors, self.atols)
        ]

    # -- groupings
    def layers(self) -> list[dict]:
        """Per transformer block (layer None = outside the blocks), in layer order."""
        return _group(self.tensors, self.atols, "layer")

    def modules(self) -> list[dict]:
        return _group(self.tensors, self.atols, "module")

    def layer_module_grid(self, atol: float = 1e-5) -> tuple[list[int], list[str], list[list[float | None]]]:
        """Sparsity per (layer, module kind), numel-weighted: rows are layers, columns module kinds."""
        i = self._atol_index(atol)
        cells: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        for s in self.tensors:
            if s.layer is None:
                continue
            cell = cells[(s.layer, s.module)]
            cell[0] += s.changed[i]
            cell[1] += s.numel
        layers = sorted({k[0] for k in cells})
        kinds = [k for k in MODULE_KINDS if any(c[1] == k for c in cells)]
        grid = [
            [
                (1 - cells[(layer, k)][0] / cells[(layer, k)][1]) if cells.get((layer, k), [0, 0])[1] else None
                for k in kinds
            ]
            for layer in layers
        ]
        return layers, kinds, grid

    @property
    def mean_rank_ratio(self) -> float | None:
        """Unweighted mean of rank / min(m, n) over the matrices whose rank was measured (the paper's figure)."""
        ratios = [s.rank_ratio for s in self.tensors if s.rank_ratio is not None]
        return sum(ratios) / len(ratios) if ratios else None

    # -- serialisation
    def provenance(self) -> dict:
        return {
            "rlsubnet_version": __version__,
            "base": self.base,
            "tuned": self.tuned,
            "options": {"atol": list(self.atols), "dtype": self.mode, "rank": self.rank, **self.options},
        }

    def to_json(self) -> dict:
        """The object ``rlsubnet compare --json`` prints and ``summary.json`` holds."""
        out = {
            **self.provenance(),
            "global": self.global_stats,
            "hidden_by_atol": {"atol": max(self.atols), "count": self.hidden_by_atol},
            "n_tensors": len(self.tensors),
            "layers": self.layers(),
            "modules": self.modules(),
            "mean_matrix_sparsity": self.mean_matrix_sparsity,
            "skipped": [s.to_record() for s in self.skipped],
        }
        if self.nonfinite:
            out["nonfinite"] = self.nonfinite
        if self.rank:
            out["mean_rank_ratio"] = self.mean_rank_ratio
            out["n_rank_matrices"] = sum(1 for s in self.tensors if s.rank_ratio is not None)
        if self.spectral is not None:
            out["spectral"] = self.spectral.to_json()
        return _json_safe(out)

    def dumps(self, **kw) -> str:
        return json.dumps(self.to_json(), **kw)

    def tensor_records(self) -> Iterable[dict]:
        for s in self.tensors:
            yield _json_safe(s.to_record())


def _json_safe(obj):
    """Replace non-finite floats (JSON has none) by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
