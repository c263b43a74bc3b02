"""Plain-text tables for the terminal and CSV files."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from rlsubnet.diff.summary import CompareResult


def fmt_pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def fmt_atol(atol: float) -> str:
    return "0 (bitwise)" if atol == 0 else f"{atol:g}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A fixed-width table; ``align`` has one 'l' or 'r' per column (default: first left, rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline_atol(atols: Sequence[float]) -> float:
    """The tolerance tables lead with: the paper's 1e-5 when measured, else the largest."""
    return 1e-5 if 1e-5 in atols else max(atols)


def _columns(results: Sequence[CompareResult]) -> tuple[list[str], list[tuple[int, int]]]:
    """Sparsity columns: every atol for one tuned checkpoint, the headline atol per checkpoint for several."""
    atols = results[0].atols
    if len(results) == 1:
        return [f"sparsity% @{fmt_atol(a)}" for a in atols], [(0, i) for i in range(len(atols))]
    h = atols.index(headline_atol(atols))
    return [f"[{k}] sparsity%" for k in range(len(results))], [(k, h) for k in range(len(results))]


def _group_table(results: Sequence[CompareResult], groups_of, key: str) -> str:
    names, cols = _columns(results)
    atols = results[0].atols
    h = atols.index(headline_atol(atols))
    tag = "" if len(results) == 1 else "[{k}] "
    means = [tag.format(k=k) + f"matrix mean% @{fmt_atol(atols[h])}" for k in range(len(results))]
    per_result = [{g[key]: g for g in groups_of(r)} for r in results]
    keys = list(per_result[0])
    for d in per_result[1:]:
        keys += [k for k in d if k not in keys]
    rows = []
    for k in keys:
        first = next(d[k] for d in per_result if k in d)
        row = [("-" if k is None else k), first["n_tensors"], f"{first['numel']:,}"]
        for ri, ai in cols:
            g = per_result[ri].get(k)
            row.append(fmt_pct(g["by_atol"][ai]["sparsity"]) if g else "-")
        for d in per_result:  # the unweighted mean over the group's matrices, at the headline atol
            g = d.get(k)
            row.append(fmt_pct(g["by_atol"][h]["mean_matrix_sparsity"]) if g else "-")
        rows.append(row)
    label = "layer" if key == "layer" else "module"
    return render_table([label, "tensors", "params", *names, *means], rows)


GROUP_LEGEND = (
    "Group tables: sparsity% pools the group's parameters; matrix mean% is the unweighted mean over its matrices."
)


def format_summary(results: Sequence[CompareResult], show_groups: bool = True) -> str:
    """The terminal report of ``rlsubnet compare``."""
    r0 = results[0]
    out = [f"base: {r0.base}    dtype: {r0.mode}    atol: {', '.join(fmt_atol(a) for a in r0.atols)}"]
    for k, r in enumerate(results):
        out.append(f"[{k}] tuned: {r.tuned}    tensors: {len(r.tensors)}    params: {r.numel:,}")
    out.append("")
    headers = (
        ["tuned"]
        + [f"sparsity% @{fmt_atol(a)}" for a in r0.atols]
        + [f"changed @{fmt_atol(r0.atols[-1])}", f"hidden by {fmt_atol(r0.atols[-1])}"]
    )
    if r0.rank:
        headers.append("mean rank%")
    rows = []
    for k, r in enumerate(results):
        row = [f"[{k}]"] + [fmt_pct(g["sparsity"]) for g in r.global_stats]
        row += [f"{r.global_stats[-1]['changed']:,}", f"{r.hidden_by_atol:,}"]
        if r.rank:
            row.append(fmt_pct(r.mean_rank_ratio, 1))
        rows.append(row)
    out.append("Global sparsity (share of parameters unchanged; density = 100 - sparsity)")
    out.append(render_table(headers, rows))
    if show_groups:
        out += ["", GROUP_LEGEND, "", "Per layer", _group_table(results, CompareResult.layers, "layer")]
        out += ["", "Per module kind", _group_table(results, CompareResult.modules, "module")]
    for k, r in enumerate(results):
        if r.skipped:
            out += ["", f"[{k}] skipped {len(r.skipped)} tensor(s) (--allow-mismatch):"]
            out += [f"  {s.name}: {s.reason}" for s in r.skipped[:20]]
            if len(r.skipped) > 20:
                out.append(f"  ... and {len(r.skipped) - 20} more (all listed in summary.json)")
        if r.nonfinite:
            out += ["", f"[{k}] WARNING: non-finite values: " + ", ".join(f"{a}={b:,}" for a, b in r.nonfinite.items())]
    for k, r in enumerate(results):
        if r.spectral is not None:
            out += ["", format_spectral(r, f"[{k}] " if len(results) > 1 else "", show_groups)]
    return "\n".join(out)


def _fmt_g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# (header, record key, format): the per-group means of the spectral metrics shown on the terminal
_SPECTRAL_COLUMNS = (
    ("rank", "numerical_rank", lambda x: _fmt_g(x, 4)),
    ("stable", "stable_rank", _fmt_g),
    ("effective", "effective_rank", lambda x: _fmt_g(x, 4)),
    ("E90", "energy_rank_90", lambda x: _fmt_g(x, 4)),
    ("E99", "energy_rank_99", lambda x: _fmt_g(x, 4)),
    ("principal%", "principal_energy", lambda x: _fmt_g(None if x is None else 100 * x)),
    ("chance%", "principal_energy_chance", lambda x: _fmt_g(None if x is None else 100 * x)),
    ("angle L°", "principal_angle_left", _fmt_g),
    ("angle R°", "principal_angle_right", _fmt_g),
    ("drift", "spectral_drift", _fmt_g),
)

SPECTRAL_LEGEND = (
    "Means over matrices. rank: numerical rank of Δ; stable: ‖Δ‖_F²/‖Δ‖_2²; effective: exp of the entropy of Δ's "
    "normalised singular values; E90/E99: fewest directions of Δ holding 90%/99% of ‖Δ‖_F²; principal%: share of "
    "‖Δ‖_F² inside W0's top-k left and right singular subspaces (chance%: a random Δ's); angle L°/R°: largest "
    "principal angle between the top-k left/right singular subspaces of W0 and W1; drift: relative change of W0's "
    "top-k singular values."
)


def _spectral_rows(groups: Sequence[dict], key: str) -> list[list[str]]:
    rows = []
    for g in groups:
        label = g[key]
        row = ["-" if label is None else str(label), str(g["matrices"])]
        row += [fmt(g[metric]) for _, metric, fmt in _SPECTRAL_COLUMNS]
        if g["nonfinite"]:
            row[1] += f" (+{g['nonfinite']} skipped)"
        rows.append(row)
    return rows


def format_spectral(r: CompareResult, tag: str = "", show_groups: bool = True) -> str:
    """The terminal tables of ``compare --spectral``: per layer, per module kind and over all matrices."""
    spec = r.spectral
    assert spec is not None
    headers = ["", "matrices", *(h for h, _, _ in _SPECTRAL_COLUMNS)]
    out = [f"{tag}Where the update points (top-k {spec.top_k})", SPECTRAL_LEGEND, ""]
    if show_groups:
        out += ["Per layer", render_table(["layer", *headers[1:]], _spectral_rows(spec.layers(), "layer")), ""]
        out += ["Per module kind", render_table(["module", *headers[1:]], _spectral_rows(spec.modules(), "module"))]
        out.append("")
    out.append(render_table(headers, _spectral_rows([{"": "all matrices", **spec.overall()}], "")))
    skipped = spec.nonfinite
    if skipped:
        out += ["", f"{tag}WARNING: spectral metrics skipped for {len(skipped)} matrix(es) with NaN or Inf values: "]
        out[-1] += ", ".join(skipped[:20]) + (f" ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    return "\n".join(out)


def layers_csv(results: Sequence[CompareResult], provenance: dict) -> str:
    """layers.csv: one row per (tuned checkpoint, layer); a '#' line first records version, inputs and options."""
    buf = io.StringIO()
    buf.write("# " + json.dumps(provenance, separators=(",", ":")) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    atols = results[0].atols
    header = ["tuned", "layer", "n_tensors", "numel"]
    for a in atols:
        header += [f"changed@{a!r}", f"sparsity@{a!r}", f"density@{a!r}", f"mean_matrix_sparsity@{a!r}"]
    w.writerow(header)
    for r in results:
        for g in r.layers():
            row = [r.tuned, "" if g["layer"] is None else g["layer"], g["n_tensors"], g["numel"]]
            for rec in g["by_atol"]:
                row += [
                    rec["changed"],
                    repr(rec["sparsity"]),
                    repr(rec["density"]),
                    "" if rec["mean_matrix_sparsity"] is None else repr(rec["mean_matrix_sparsity"]),
                ]
            w.writerow(row)
    return buf.getvalue()
