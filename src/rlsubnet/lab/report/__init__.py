"""The demo's report: ``report.md``, PNG figures under ``figures/`` and their records in results.json.

It renders the results dict built by :mod:`rlsubnet.lab.pipeline` from the measurements of
:mod:`rlsubnet.lab.measure`: records only, never a checkpoint, and no fact of its own. Every number printed is one
that was measured in this run; the paper's numbers come from :mod:`rlsubnet.lab.paper_numbers` and are always
labelled as the paper's. Verdicts follow fixed, stated criteria (:mod:`~rlsubnet.lab.report.criteria`).

- ``records``: accessors and formatting over the results dict;
- ``criteria``: the thresholds behind every verdict;
- ``claims``, ``subnetwork_claims``: the paper's claims checked, each with its verdict and why; ``spectral_claims``:
  later work's (where the update points, the optimizer as a cause);
- ``figures``, ``subnetwork_figures``: the PNG figures; ``markdown``, ``subnetwork_markdown``,
  ``spectral_markdown``: report.md (the last also draws its figure).
"""

from __future__ import annotations

import json
from pathlib import Path

from rlsubnet.fileio import atomic_write_bytes, atomic_write_text
from rlsubnet.lab.report.claims import assess
from rlsubnet.lab.report.criteria import CRITERIA
from rlsubnet.lab.report.figures import render_figures
from rlsubnet.lab.report.markdown import render_markdown, summary_lines
from rlsubnet.lab.report.records import adamw_view, json_safe
from rlsubnet.lab.report.spectral_claims import assess_optimizer, assess_spectral

__all__ = ["prepare_report", "summary_lines", "write_report"]


def prepare_report(results: dict, executor=None) -> dict[str, tuple[bytes, dict]]:
    """Assess the claims and render every figure (in memory); adds "claims", "criteria" and "figures" to ``results``.

    The paper's claims are checked on the AdamW stages (:func:`~rlsubnet.lab.report.records.adamw_view`); the
    SGD stages enter the claims about the optimizer and where the update points. ``executor``: running worker
    processes that draw part of the figures (:func:`~rlsubnet.lab.report.figures.render_figures`)."""
    figures = render_figures(results, executor)
    results["claims"] = assess(adamw_view(results)) + assess_optimizer(results) + assess_spectral(results)
    results["criteria"] = CRITERIA
    results["figures"] = {name: rec for name, (_, rec) in figures.items()}
    return figures


def write_report(results: dict, out_dir: str | Path, figures: dict[str, tuple[bytes, dict]] | None = None) -> None:
    """Write figures/*.png, results.json and report.md into ``out_dir``, each atomically, the report last."""
    out_dir = Path(out_dir)
    if figures is None:
        figures = prepare_report(results)
    for name, (png, _) in figures.items():
        atomic_write_bytes(out_dir / "figures" / name, png)
    atomic_write_text(out_dir / "results.json", json.dumps(json_safe(results), indent=1) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(json_safe(results), results["claims"], list(figures)))
