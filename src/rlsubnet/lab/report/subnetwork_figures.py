"""The report's figures of the subnetwork experiments (the paper's Tables 3 and 4): the re-runs' identity with
the full run, and the masks' overlap against chance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.records import ident, pct, sub_settings
from rlsubnet.report.overlap_outputs import matrix_heatmap, ratio_matrix
from rlsubnet.report.plots import pyplot

FigureFn = Callable[[dict], Any]  # the results dict -> a matplotlib Figure


def _fig_identity(results):
    """Table 3 as bars: identity with θ_full per run and atol, overall (bars) and inside the mask (dots)."""
    plt = pyplot()
    sub = results["subnetwork"]
    algs = list(sub["reruns"])
    fig, axes = plt.subplots(1, len(algs), figsize=(5.6 * len(algs), 4.4), squeeze=False)
    atols = (0.0, 1e-5, 1e-4)
    colors = ("tab:gray", "tab:blue", "tab:green")
    for ax, alg in zip(axes[0], algs):
        sec = sub["reruns"][alg]
        rows = sec["rows"]
        width = 0.8 / len(atols)
        for j, (a, col) in enumerate(zip(atols, colors)):
            xs = [i + (j - 1) * width for i in range(len(rows))]
            ax.bar(xs, [100 * ident(r, a) for r in rows], width, color=col, label=f"atol {a:g}")
            ax.scatter(
                xs,
                [100 * (ident(r, a, True) or 0) for r in rows],
                color="black",
                marker="_",
                s=90,
                zorder=3,
                label="inside the mask" if j == 0 else None,
            )
            for x, r in zip(xs, rows):
                ax.text(x, 100 * ident(r, a) + 0.6, f"{100 * ident(r, a):.1f}", ha="center", fontsize=6, rotation=90)
        for label, vals, style in (
            ("paper DPO", paper.TABLE3["DPO"], "--"),
            ("paper PRIME", paper.TABLE3["PRIME"], ":"),
        ):
            ax.axhline(
                vals[1e-5], color="tab:blue", linestyle=style, linewidth=0.9, label=f"{label}, 1e-5: {vals[1e-5]}%"
            )
        ax.axhline(100, color="tab:green", linestyle="--", linewidth=0.9, label="paper, 1e-4: 100%")
        short = {
            "subnetwork re-run": "θ_sub",
            "random-mask re-run": "random mask",
            "predicted-mask re-run": "predicted mask",
            "full run, another seed": "another seed",
        }
        ax.set_xticks(range(len(rows)), [f"{r['run']}\n({short.get(r['role'], r['role'])})" for r in rows], fontsize=7)
        vals = [ident(r, a, inside) for r in rows for a in atols for inside in (False, True)]
        lo = 100 * min(v for v in vals if v is not None)
        ax.set_ylim(max(0, lo - 10), 108)
        ax.set_ylabel(f"identical to θ_full = `{sec['full']}` (%)")
        ax.set_title(
            f"{alg.upper()}: re-runs from θ0 vs the full run (mask density {pct(sec['mask']['density'])})", fontsize=9
        )
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    names = [n for sec in sub["reruns"].values() for n in [sec["full"]] + [r["run"] for r in sec["rows"]]]
    fig.suptitle(
        "Subnetwork re-runs vs θ_full (the paper's Table 3): share of parameters with |θ_full − θ| ≤ atol\n"
        + sub_settings(results, names),
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _fig_overlap(results, which: str):
    ov = results["subnetwork"]["overlap"]
    labels = ov["labels"]
    m = ov["matrix"]
    settings = sub_settings(results, labels)
    if which == "o1":
        return matrix_heatmap(
            labels,
            m["o1"],
            "Subnetwork overlap o1 = |A∩B| / |A| (%), row A, column B",
            settings,
            cbar_label="o1 (%)",
            vmax=100,
        )
    ratio = ratio_matrix(m["o1"], m["magnitude_chance_o1"] if which == "magnitude" else m["chance_o1"])
    title = (
        "o1 / magnitude-matched chance (1 = explained by |w| in θ0), row A, column B"
        if which == "magnitude"
        else "o1 / density chance (the paper's baseline; 1 = chance), row A, column B"
    )
    return matrix_heatmap(labels, ratio, title, settings, cbar_label="× chance", percent=False)


SUBNETWORK_FIGURES: dict[str, tuple[str, FigureFn]] = {
    "subnetwork_identity": ("Subnetwork re-runs vs θ_full (Table 3)", _fig_identity),
    "overlap_o1": ("Subnetwork overlap o1 (Table 4)", lambda r: _fig_overlap(r, "o1")),
    "overlap_o1_over_chance": ("Overlap over the density chance", lambda r: _fig_overlap(r, "chance")),
    "overlap_o1_over_magnitude_chance": (
        "Overlap over the magnitude-matched chance",
        lambda r: _fig_overlap(r, "magnitude"),
    ),
}

SUBNETWORK_FIGURE_DATA = {
    "subnetwork_identity": "subnetwork.reruns.<algorithm>.rows[].identity (bf16) and the paper's Table 3 (lab.paper_numbers)",
    "overlap_o1": "subnetwork.overlap.matrix.o1 (rows A, columns B); pairs in subnetwork.overlap.pairs",
    "overlap_o1_over_chance": "subnetwork.overlap.matrix.o1 / .chance_o1",
    "overlap_o1_over_magnitude_chance": "subnetwork.overlap.matrix.o1 / .magnitude_chance_o1",
}
