"""The files ``rlsubnet compare --out DIR`` writes. Everything is rendered in memory first, then the set is
written all or none (:func:`rlsubnet.fileio.write_file_set`), so a failure never leaves a partial set of outputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rlsubnet._version import __version__
from rlsubnet.diff.summary import CompareResult
from rlsubnet.fileio import output_lock, write_file_set
from rlsubnet.report import plots
from rlsubnet.report.tables import fmt_atol, headline_atol, layers_csv


def results_json(results: Sequence[CompareResult]) -> dict:
    """One result: its object. Several: {"base", "comparisons": [one object per tuned checkpoint]}."""
    if len(results) == 1:
        return results[0].to_json()
    return {"rlsubnet_version": __version__, "base": results[0].base, "comparisons": [r.to_json() for r in results]}


def provenance(results: Sequence[CompareResult]) -> dict:
    p = results[0].provenance()
    p["tuned"] = [r.tuned for r in results] if len(results) > 1 else results[0].tuned
    return p


def settings_line(r: CompareResult) -> str:
    return f"dtype {r.mode}, atol {', '.join(fmt_atol(a) for a in r.atols)}, rlsubnet {__version__}"


def render_compare_outputs(results: Sequence[CompareResult]) -> dict[str, bytes]:
    """File name -> contents for every output file."""
    prov = provenance(results)
    files: dict[str, bytes] = {}
    files["summary.json"] = (json.dumps(results_json(results), indent=2) + "\n").encode()

    lines = [json.dumps({"kind": "meta", **prov})]
    for r in results:
        for rec in r.tensor_records():
            lines.append(json.dumps({"kind": "tensor", "tuned": r.tuned, **rec}))
    files["tensors.jsonl"] = ("\n".join(lines) + "\n").encode()
    files["layers.csv"] = layers_csv(results, prov).encode("utf-8", errors="backslashreplace")

    for k, r in enumerate(results):
        atol = headline_atol(r.atols)
        layers, kinds, grid = r.layer_module_grid(atol)
        fig = plots.heatmap(
            layers,
            kinds,
            grid,
            f"Sparsity per layer and module: {Path(r.tuned).name} vs {Path(r.base).name}",
            f"{settings_line(r)}; cells at atol {fmt_atol(atol)}",
        )
        files["heatmap.png" if len(results) == 1 else f"heatmap-{k}.png"] = plots.to_png(fig, r.provenance())
    series = [
        (f"[{k}] {Path(r.tuned).name}", list(r.atols), [g["sparsity"] for g in r.global_stats])
        for k, r in enumerate(results)
    ]
    fig = plots.sparsity_vs_atol(series, "Global sparsity vs tolerance", settings_line(results[0]))
    files["sparsity_vs_atol.png"] = plots.to_png(fig, prov)
    spectral = [(f"[{k}] {Path(r.tuned).name}", r.spectral) for k, r in enumerate(results) if r.spectral is not None]
    if spectral:
        fig = plots.spectral_profile(
            [(label, spec.layers()) for label, spec in spectral],
            f"Where the update points: means per layer vs {Path(results[0].base).name}",
            f"{settings_line(results[0])}, top-k {spectral[0][1].top_k}",
        )
        files["spectral.png"] = plots.to_png(fig, prov)
    return files


OUTPUT_FILES = (
    "summary.json",
    "tensors.jsonl",
    "layers.csv",
    "heatmap.png",
    "heatmap-*.png",
    "sparsity_vs_atol.png",
    "spectral.png",
)


def write_compare_outputs(results: Sequence[CompareResult], out_dir: str | Path) -> list[Path]:
    # All files or none; heatmaps of an earlier run with more tuned checkpoints, or the spectral figure of an
    # earlier run with --spectral, would mislead: removed.
    with output_lock(out_dir, members=OUTPUT_FILES):
        return write_file_set(
            out_dir, render_compare_outputs(results), stale=("heatmap.png", "heatmap-*.png", "spectral.png")
        )
