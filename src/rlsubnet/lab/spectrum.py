"""Where a stage's update points: the spectral metrics of :mod:`rlsubnet.diff.spectral` for every 2-D non-norm
matrix of a stage's bf16 checkpoint against θ0, as ``rlsubnet compare --spectral`` computes them (W0, W1 and Δ in
bf16, Δ rounded there), pooled per layer, per module and over all matrices.

Top-k. The small model's matrices are 128×128 (attention), 128×512 and 512×128 (MLP) and 28×128 (the tied
embedding); k = 8 is 6% of their smaller side (29% of the embedding's): a principal subspace, not most of the
matrix, with a chance level of the one-sided principal energy (k/m, k/n) of 6.25% or less for every block matrix,
so a concentration of Δ there stands out.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.diff.names import is_norm
from rlsubnet.diff.spectral import METRICS, aggregate, spectral_stats

TOP_K = 8
RANDOM_SEED = 1234  # the i.i.d. reference Δ: fixed, so that every run states the same reference


def _matrices(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(str(path)) as ck:
        return {n: ck.read(n) for n in ck.names()}


def _wanted(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.numel() > 0 and t.is_floating_point() and not is_norm(name)


def overall(records: Iterable[dict]) -> dict:
    """The unweighted mean of each metric over the matrices where it is defined (the paper's mean rank is
    pooled the same way), and the mean of the ranks as a share of min(m, n)."""
    ok = [r for r in records if not r.get("nonfinite")]
    out: dict = {"matrices": len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    for key in ("numerical_rank", "energy_rank_90", "energy_rank_99", "effective_rank", "stable_rank"):
        values = [r[key] / min(r["shape"]) for r in ok if r.get(key) is not None]
        out[f"{key}_ratio"] = sum(values) / len(values) if values else None
    ratios = [
        r["principal_energy"] / r["principal_energy_chance"]
        for r in ok
        if r.get("principal_energy") is not None and r.get("principal_energy_chance")
    ]
    out["principal_energy_over_chance"] = sum(ratios) / len(ratios) if ratios else None
    return out


def measure_spectral(theta0_dir: Path, model_dir: Path, top_k: int = TOP_K) -> dict:
    """Spectral metrics of ``model_dir``'s bf16 checkpoint against θ0 (``theta0_dir``), JSON-ready."""
    base = _matrices(Path(theta0_dir) / "model.safetensors")
    tuned = _matrices(Path(model_dir) / "model.safetensors")
    records = []
    for name, w0 in base.items():
        if not _wanted(name, w0):
            continue
        w0c, w1c = w0.to(torch.bfloat16), tuned[name].to(torch.bfloat16)
        delta = torch.sub(w1c, w0c).float()  # Δ as the changed-test sees it: rounded in bf16
        k = min(top_k, *w0.shape)
        records.append(spectral_stats(w0c, w1c, delta, k, name=name).to_record())
    pooled = aggregate(records)
    return {
        "top_k": top_k,
        "matrices": records,
        "layers": pooled["layers"],
        "modules": pooled["modules"],
        "overall": overall(records),
    }


def random_reference(theta0_dir: Path, top_k: int = TOP_K) -> dict:
    """What an update of i.i.d. Gaussian entries gives on θ0's matrices (their shapes and principal subspaces):
    the scale against which "effectively low rank" and "off the principal directions" are read."""
    base = _matrices(Path(theta0_dir) / "model.safetensors")
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    records = []
    for name, w0 in base.items():
        if not _wanted(name, w0):
            continue
        w0c = w0.to(torch.bfloat16)
        delta = torch.randn(w0.shape, generator=gen) * 1e-3
        w1c = (w0c.float() + delta).to(torch.bfloat16)
        k = min(top_k, *w0.shape)
        rec = spectral_stats(w0c, w1c, delta, k, name=name).to_record()
        # W1 = W0 + a random Δ is not a trained matrix: its rotation and drift say nothing; Δ's own metrics do.
        for key in ("principal_angle_left", "principal_angle_right", "spectral_drift"):
            rec[key] = None
        records.append(rec)
    return {"top_k": top_k, "seed": RANDOM_SEED, "overall": overall(records)}


def measure_finished(theta0_dir: Path, stage) -> dict:
    """Everything the report shows about a finished stage: :func:`rlsubnet.lab.measure.measure_stage` and its
    spectral metrics (what a worker process computes right after training the stage)."""
    from rlsubnet.lab.measure import measure_stage

    return {**measure_stage(theta0_dir, stage), "spectral": measure_spectral(theta0_dir, stage.model_dir)}
