"""PNG figures. Each figure states the settings that produced it; PNG metadata records the provenance."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence

from rlsubnet._version import __version__


def _printable_labels(f: Callable[[float, int | None], str]) -> Callable[[float, int | None], str]:
    from rlsubnet.fileio import printable

    return lambda x, pos: printable(str(f(x, pos)))


def pyplot():
    """matplotlib's pyplot on the Agg backend (matplotlib is optional: only the figures import it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_png(fig, provenance: dict) -> bytes:
    """Render a figure to PNG bytes with the provenance in its text chunks."""
    from matplotlib.text import Text
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    from rlsubnet.fileio import printable

    # Labels made of file names: the font renderer takes only valid Unicode, not an undecodable byte's surrogate.
    for text in fig.findobj(Text):
        text.set_text(printable(text.get_text()))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            fmt = axis.get_major_formatter()
            if isinstance(fmt, FixedFormatter):
                fmt.seq = [printable(str(s)) for s in fmt.seq]
            elif isinstance(fmt, FuncFormatter):  # what set_ticks(..., labels) installs
                fmt.func = _printable_labels(fmt.func)
    buf = io.BytesIO()
    fig.savefig(
        buf,
        format="png",
        dpi=110,
        bbox_inches="tight",
        metadata={"Software": f"rlsubnet {__version__}", "Description": json.dumps(provenance, separators=(",", ":"))},
    )
    pyplot().close(fig)
    return buf.getvalue()


def heatmap(
    layers: Sequence[int],
    kinds: Sequence[str],
    grid: Sequence[Sequence[float | None]],
    title: str,
    settings: str,
    *,
    cbar_label: str = "sparsity (%)",
):
    """Layer × module heatmap of a fraction (shown in %); empty cells stay blank."""
    import numpy as np

    plt = pyplot()
    data = np.array([[np.nan if v is None else 100 * v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * max(1, len(kinds)), 1.2 + 0.32 * max(1, len(layers))))
    if data.size:
        im = ax.imshow(
            data, aspect="auto", cmap="viridis", vmin=np.nanmin(data) if np.isfinite(data).any() else 0, vmax=100
        )
        fig.colorbar(im, ax=ax, label=cbar_label)
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{settings}", fontsize=9)
    return fig


def sparsity_vs_atol(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, settings: str, reference=None
):
    """Sparsity (%) against atol, one line per series; atol 0 sits at the left of a symlog axis.

    ``reference`` is an optional list of (label, atols, sparsities) drawn dashed (e.g. the paper's Table 6).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    all_atols = [a for _, atols, _ in series for a in atols] + [a for _, atols, _ in (reference or []) for a in atols]
    positive = [a for a in all_atols if a > 0]
    linthresh = min(positive) / 10 if positive else 1e-9
    for label, atols, sp in series:
        ax.plot(atols, [100 * s for s in sp], marker="o", label=label)
    for label, atols, sp in reference or []:
        ax.plot(atols, [100 * s for s in sp], marker="x", linestyle="--", label=label)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlabel("atol (|Δ| ≤ atol counts as unchanged; 0 = bitwise)")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(f"{title}\n{settings}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


# (panel title, [(record key, line style, label suffix)], shown in %): the panels of spectral_profile
_SPECTRAL_PANELS = (
    (
        "share of ‖Δ‖² in W0's top-k subspaces (%)",
        [("principal_energy", "-", ""), ("principal_energy_chance", ":", " chance")],
        True,
    ),
    (
        "largest principal angle (°)",
        [("principal_angle_left", "-", " left"), ("principal_angle_right", "--", " right")],
        False,
    ),
    ("drift of W0's top-k singular values", [("spectral_drift", "-", "")], False),
    ("rank of Δ (mean)", [("effective_rank", "-", " effective"), ("energy_rank_90", "--", " 90% energy")], False),
)


def spectral_profile(series: Sequence[tuple[str, Sequence[dict]]], title: str, settings: str):
    """The spectral metrics per layer, one colour per series (label, the ``layers`` of a spectral summary). A
    panel whose values are all positive has a log axis: RL and SFT updates differ by orders of magnitude."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10.0, 7.0))
    for ax, (panel, lines, percent) in zip(axes.flat, _SPECTRAL_PANELS):
        values = []
        for n, (label, layers) in enumerate(series):
            x = [g["layer"] for g in layers]
            for key, style, suffix in lines:
                y = np.array([np.nan if g[key] is None else g[key] * (100 if percent else 1) for g in layers], float)
                values.append(y)
                ax.plot(x, y, linestyle=style, marker="o", markersize=3, color=f"C{n}", label=label + suffix)
        finite = np.concatenate(values)[np.isfinite(np.concatenate(values))] if values else np.array([])
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if values:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}\n{settings}", fontsize=9)
    fig.tight_layout()
    return fig
