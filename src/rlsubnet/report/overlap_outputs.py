"""Tables and files for ``rlsubnet overlap``: the pair table, the o1 matrix, heatmaps.

Everything is rendered in memory first, then each file is written atomically (as for ``compare --out``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rlsubnet._version import __version__
from rlsubnet.fileio import output_lock, write_file_set
from rlsubnet.masks.overlap import OverlapResult
from rlsubnet.report import plots
from rlsubnet.report.tables import fmt_pct, render_table


def short_label(label: str) -> str:
    name = Path(label).name
    for suffix in (".safetensors", ".mask"):
        name = name.removesuffix(suffix)
    return name or label


def pairs_json(result: OverlapResult) -> list[dict]:
    """What ``--json`` prints: one object per pair (a, b as given; figures; layer, module and bucket rows)."""
    return [p.to_json() for p in result.pairs]


def format_pairs(result: OverlapResult) -> str:
    mm = result.matrix_magnitude_chance_o1 is not None
    headers = ["A", "B", "dens A %", "dens B %", "o1 %", "chance o1 %"]
    headers += ["mag. chance o1 %"] if mm else []
    headers += ["o2 %", "chance o2 %"] + (["mag. chance o2 %"] if mm else []) + ["Jaccard %"]
    rows = []
    for p in result.pairs:
        f = p.figures
        row = [
            short_label(p.a),
            short_label(p.b),
            fmt_pct(f["density_a"]),
            fmt_pct(f["density_b"]),
            fmt_pct(f["o1"]),
            fmt_pct(f["chance_o1"]),
        ]
        row += [fmt_pct(f["magnitude_chance_o1"])] if mm else []
        row += [fmt_pct(f["o2"]), fmt_pct(f["chance_o2"])] + ([fmt_pct(f["magnitude_chance_o2"])] if mm else [])
        row += [fmt_pct(f["jaccard"])]
        rows.append(row)
    return render_table(headers, rows, "ll" + "r" * (len(headers) - 2))


def format_groups(result: OverlapResult, key: str) -> str:
    """Per-module (or per-layer) rows of the first pair."""
    p = result.pairs[0]
    mm = result.matrix_magnitude_chance_o1 is not None
    rows = []
    for r in getattr(p, "modules" if key == "module" else "layers"):
        g = r[key]
        row = [
            "-" if g is None else str(g),
            f"{r['numel']:,}",
            fmt_pct(r["density_a"]),
            fmt_pct(r["density_b"]),
            fmt_pct(r["o1"]),
            fmt_pct(r["chance_o1"]),
        ]
        row += [fmt_pct(r.get("magnitude_chance_o1"))] if mm else []
        row += [fmt_pct(r["o2"]), fmt_pct(r["chance_o2"])] + ([fmt_pct(r.get("magnitude_chance_o2"))] if mm else [])
        rows.append(row)
    headers = [key, "params", "dens A %", "dens B %", "o1 %", "chance o1 %"] + (["mag. chance o1 %"] if mm else [])
    headers += ["o2 %", "chance o2 %"] + (["mag. chance o2 %"] if mm else [])
    return render_table(headers, rows)


def format_overlap(result: OverlapResult) -> str:
    parts = [format_pairs(result)]
    if len(result.pairs) == 1:
        parts.append(
            f"\nper module ({short_label(result.pairs[0].a)} vs {short_label(result.pairs[0].b)}):\n"
            + format_groups(result, "module")
        )
    s = result.settings
    line = "o1 = |A∩B|/|A|, o2 = |A∩B|/|B|; chance o1 = density of B, chance o2 = density of A (independent masks)"
    if s.get("buckets"):
        line += f"\nmagnitude-matched chance: change probability per |w| bucket of the base; buckets: {s['buckets']}"
    parts.append("\n" + line)
    return "\n".join(parts)


# A pair's overlap figures and the paper's chance baseline of each; with a base, the magnitude-matched chance.
PAIR_FIGURES = ("o1", "o2", "jaccard", "chance_o1", "chance_o2", "chance_jaccard")
MAGNITUDE_CHANCE_FIGURES = ("magnitude_chance_o1", "magnitude_chance_o2", "magnitude_chance_jaccard")


def pairs_csv(result: OverlapResult) -> str:
    keys = ["a", "b", "numel", "count_a", "count_b", "intersection", "density_a", "density_b", *PAIR_FIGURES]
    if result.matrix_magnitude_chance_o1 is not None:
        keys += ["expected_intersection_magnitude", *MAGNITUDE_CHANCE_FIGURES]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for p in result.pairs:
        row = {"a": p.a, "b": p.b, **p.figures}
        w.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
    return buf.getvalue()


def matrix_csv(labels: list[str], matrix: list[list[float | None]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["A \\ B"] + labels)
    for lab, row in zip(labels, matrix):
        w.writerow([lab] + ["" if v is None else v for v in row])
    return buf.getvalue()


def matrix_heatmap(
    labels: list[str], matrix, title: str, settings: str, *, cbar_label: str, percent: bool = True, vmax=None
):
    """Square A × B heatmap (rows A, columns B) with the values written in the cells."""
    import numpy as np

    plt = plots.pyplot()
    data = np.array(
        [[np.nan if v is None else (100 * v if percent else v) for v in row] for row in matrix], dtype=float
    )
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * n, 1.6 + 0.7 * n))
    finite = data[np.isfinite(data)]
    top = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=top or 1.0)
    fig.colorbar(im, ax=ax, label=cbar_label)
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:.1f}" if percent else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v < 0.6 * (top or 1.0) else "black",
            )
    short = [short_label(label) for label in labels]
    ax.set_xticks(range(n), short, rotation=45, ha="right")
    ax.set_yticks(range(n), short)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    ax.set_title(f"{title}\n{settings}", fontsize=9)
    return fig


def ratio_matrix(num, den):
    """Cell-wise num / den, blank on the diagonal (a mask against itself says nothing about chance)."""
    return [
        [(a / b) if (i != j and a is not None and b) else None for j, (a, b) in enumerate(zip(r1, r2))]
        for i, (r1, r2) in enumerate(zip(num, den))
    ]


def render_overlap_outputs(result: OverlapResult) -> dict[str, bytes]:
    prov = {
        "rlsubnet_version": __version__,
        "command": "overlap",
        "masks": result.labels,
        "base": (result.settings.get("base") or {}).get("source"),
    }
    settings = f"rlsubnet {__version__}; cell = |A∩B| / |A| (o1), row A, column B"
    ratio_settings = f"rlsubnet {__version__}; cell = o1 / chance o1, row A, column B"
    files: dict[str, bytes] = {
        "overlap.json": (json.dumps({"rlsubnet_version": __version__, **result.to_json()}, indent=2) + "\n").encode(),
        "pairs.csv": pairs_csv(result).encode("utf-8", errors="backslashreplace"),
        "matrix_o1.csv": matrix_csv(result.labels, result.matrix_o1).encode("utf-8", errors="backslashreplace"),
        "matrix_chance_o1.csv": matrix_csv(result.labels, result.matrix_chance_o1).encode(
            "utf-8", errors="backslashreplace"
        ),
    }
    fig = matrix_heatmap(
        result.labels, result.matrix_o1, "Subnetwork overlap o1", settings, cbar_label="o1 (%)", vmax=100
    )
    files["heatmap_o1.png"] = plots.to_png(fig, prov)
    ratio = ratio_matrix(result.matrix_o1, result.matrix_chance_o1)
    fig = matrix_heatmap(
        result.labels, ratio, "o1 / density chance (1 = chance)", ratio_settings, cbar_label="× chance", percent=False
    )
    files["heatmap_o1_over_chance.png"] = plots.to_png(fig, prov)
    if result.matrix_magnitude_chance_o1 is not None:
        files["matrix_magnitude_chance_o1.csv"] = matrix_csv(result.labels, result.matrix_magnitude_chance_o1).encode(
            "utf-8", errors="backslashreplace"
        )
        ratio = ratio_matrix(result.matrix_o1, result.matrix_magnitude_chance_o1)
        fig = matrix_heatmap(
            result.labels,
            ratio,
            "o1 / magnitude-matched chance (1 = explained by |w|)",
            ratio_settings,
            cbar_label="× magnitude-matched chance",
            percent=False,
        )
        files["heatmap_o1_over_magnitude_chance.png"] = plots.to_png(fig, prov)
    return files


OUTPUT_FILES = ("overlap.json", "pairs.csv", "matrix_*.csv", "heatmap_*.png")


def write_overlap_outputs(result: OverlapResult, out_dir: str | Path) -> list[Path]:
    with output_lock(out_dir, members=OUTPUT_FILES):
        return write_file_set(out_dir, render_overlap_outputs(result))
