"""Measurements of a finished stage against θ0. Every sparsity figure comes from the compare engine; the
per-entry views (dynamics decomposition, P(changed | |w|)) come from the pure functions of
``rlsubnet.diff.dynamics``, and the demo checks that the two agree on the final model to the entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlsubnet.errors import RlsubnetError

TABLE6_ATOLS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)  # the paper's sparsity-vs-tolerance table, plus 0 and above
DYNAMICS_ATOLS = (0.0, 1e-5)


def _global(result, atol: float) -> dict:
    return next(g for g in result.global_stats if g["atol"] == atol)


def _read_all(path: Path) -> dict:
    from rlsubnet.checkpoint import open_checkpoint

    with open_checkpoint(str(path)) as ck:
        return {n: ck.read(n) for n in ck.names()}


def measure_stage(theta0_dir: Path, stage, *, atols: Sequence[float] = TABLE6_ATOLS) -> dict:
    """Everything the report shows about one stage (JSON-ready)."""
    import json

    from rlsubnet.diff.dynamics import decompose_tensor, magnitude_profile
    from rlsubnet.engine import compare, compare_many

    theta0 = str(theta0_dir / "model.safetensors")
    bf16 = compare(theta0, str(stage.model_dir / "model.safetensors"), atol=atols, dtype="bf16", rank=True)
    fp32 = compare(theta0, str(stage.master_path), atol=atols, dtype="fp32")
    layers, kinds, grid = bf16.layer_module_grid(1e-5)
    _, _, grid0 = bf16.layer_module_grid(0.0)

    snaps = stage.snapshots
    snap_paths = [str(p) for _, p in snaps]
    vs_theta0 = compare_many(theta0, snap_paths, atol=DYNAMICS_ATOLS, dtype="bf16") if snaps else []
    consecutive = []
    prev = theta0
    for (step, p), r0 in zip(snaps, vs_theta0):
        r = compare(prev, str(p), atol=DYNAMICS_ATOLS, dtype="bf16")
        consecutive.append({"step": step, "sparsity": {repr(a): r.sparsity(a) for a in DYNAMICS_ATOLS}})
        prev = str(p)
    sparsity_vs_step = [{"step": 0, "sparsity": {repr(a): 1.0 for a in DYNAMICS_ATOLS}}] + [
        {"step": s, "sparsity": {repr(a): r.sparsity(a) for a in DYNAMICS_ATOLS}} for (s, _), r in zip(snaps, vs_theta0)
    ]

    # Per-entry views: read θ0, the final model and the snapshots (bf16, a few MB for the lab models).
    base = _read_all(Path(theta0))
    final = _read_all(stage.model_dir / "model.safetensors")
    masters = _read_all(stage.master_path)
    snapshot_tensors = [_read_all(Path(p)) for p in snap_paths]
    decomposition = []
    if snapshot_tensors:
        from rlsubnet.diff.dynamics import DynamicsCounts

        totals = [DynamicsCounts(atol=a) for a in DYNAMICS_ATOLS]
        for name, b in base.items():
            for tot, c in zip(totals, decompose_tensor(b, (s[name] for s in snapshot_tensors), DYNAMICS_ATOLS)):
                tot.add(c)
        decomposition = [t.to_record() for t in totals]
        # The last snapshot is the final model: the decomposition's final share must be the engine's density.
        for rec in decomposition:
            engine_changed = _global(bf16, rec["atol"])["changed"]
            if rec["final"] != engine_changed:
                raise RlsubnetError(
                    f"stage {stage.name}: snapshot decomposition counts {rec['final']} changed entries at atol "
                    f"{rec['atol']} but the compare engine counts {engine_changed}: the last snapshot is not the final model"
                )
    magnitude = magnitude_profile(base, final, DYNAMICS_ATOLS, dtype="bf16").to_record()
    magnitude_fp32 = magnitude_profile(base, masters, (0.0, 1e-5), dtype="fp32").to_record()

    steps_file = stage.dir / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else None

    return {
        "bf16": bf16.to_json(),
        "bf16_rank": {"mean_rank_ratio": bf16.mean_rank_ratio,
                      "per_matrix": [{"name": t.name, "rank": t.rank, "rank_ratio": t.rank_ratio}
                                     for t in bf16.tensors if t.rank is not None]},
        "matrices": [{"name": t.name, "module": t.module, "layer": t.layer, "shape": list(t.shape),
                      "sparsity": 1 - t.density(1e-5), "sparsity_0": 1 - t.density(0.0), "rank_ratio": t.rank_ratio}
                     for t in bf16.tensors if len(t.shape) == 2 and t.module not in ("norm", "embed", "lm_head")],
        "fp32": fp32.to_json(),
        "sparsity": {"bf16": {repr(a): bf16.sparsity(a) for a in atols}, "fp32": {repr(a): fp32.sparsity(a) for a in atols}},
        "grid": {"layers": layers, "modules": kinds, "sparsity_1e-05": grid, "sparsity_0": grid0},
        "sparsity_vs_step": sparsity_vs_step,
        "consecutive_snapshots": consecutive,
        "snapshot_every": stage.record["spec"].get("snapshot_every"),
        "decomposition_snapshots": decomposition,
        "step_to_step": steps["steps"] if steps else [],
        "decomposition_every_step": steps["decomposition_every_step"] if steps else [],
        "magnitude_bf16": magnitude,
        "magnitude_fp32": magnitude_fp32,
    }
