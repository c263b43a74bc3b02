"""report.md's sections on later work: the optimizer as a cause of the sparsity (SGD against AdamW) and where the
update points (spectral metrics, RL against SFT at one learning rate), and their figure. Every number in them is
one of results.json; the verdicts are in the claims table (:mod:`~rlsubnet.lab.report.spectral_claims`)."""

from __future__ import annotations

from rlsubnet.lab.report.criteria import CRITERIA
from rlsubnet.lab.report.records import acc, md_table, optimizer_of, pct, pts, sp
from rlsubnet.lab.report.spectral_claims import angle, spectral, spectral_pairs


def _f(x, fmt: str = ".3g", unit: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{unit}"


def _lrs(results: dict, names: list[str]) -> str:
    return ", ".join(f"{x:g}" for x in sorted({results["stages"][n]["spec"]["learning_rate"] for n in names}))


def _sgd_names(results: dict) -> list[str]:
    return [n for n, s in results["stages"].items() if optimizer_of(s) == "sgd"]


def sgd_summary_lines(results: dict) -> list[str]:
    """The summary's line on the SGD stages."""
    st = results["stages"]
    tsk = results["config"]["task"]
    th = results["theta0"]["accuracy"][tsk]["bf16"]["accuracy"]
    parts = [
        f"{n} {pct(1 - sp(st[n]))} (gain {pts(acc(st[n], tsk)['accuracy'] - th)})"
        for n in _sgd_names(results)
        if tsk in st[n]["accuracy"]
    ]
    if not parts:
        return []
    adam = [
        f"{n} {pct(1 - sp(st[n]))} (gain {pts(acc(st[n], tsk)['accuracy'] - th)})"
        for n in ("grpo", "sft")
        if n in st and tsk in st[n]["accuracy"]
    ]
    return [
        f"- With plain SGD at lr {_lrs(results, _sgd_names(results))}, the share of bf16 parameters updated (atol 1e-5) and "
        f"the held-out {tsk} gain: {', '.join(parts)}; with AdamW: {', '.join(adam) or '–'}."
    ]


def optimizer_markdown(results: dict) -> list[str]:
    """The SGD stages beside the AdamW stages they are compared with."""
    st = results["stages"]
    sgd = _sgd_names(results)
    if not sgd:
        return []
    c = results["config"]
    tsk = c["task"]
    th = results["theta0"]["accuracy"][tsk]["bf16"]
    names = [n for n in ("grpo", "grpo-sftlr", "sft-matched", "sft") if n in st] + sgd
    md = ["", "## The optimizer as a cause: plain SGD against AdamW", ""]
    md.append(
        f"`grpo-sgd` and `sft-sgd` repeat `grpo` and `sft` (same data, order, steps, batch, seed and clipping) with "
        f"plain SGD (no momentum, no weight decay) at lr {_lrs(results, sgd)} in place of AdamW. The learning rate was "
        "chosen before this run by a trial on another seed, scored on the validation split (never on this run's "
        "held-out problems): the smallest of the grid at which GRPO with SGD improved accuracy at least as much as "
        "GRPO with AdamW at the RL learning rate (docs/demo.md). Verdict: claim `sgd-sparser` above ('far fewer' = "
        f"at most {CRITERIA['far_fewer_at_most']:g}× AdamW's density)."
    )
    md.append("")
    rows = []
    for n in names:
        s = st[n]
        o = spectral(s) or {}
        a = acc(s, tsk) if tsk in s["accuracy"] else None
        rows.append(
            [
                f"`{n}`",
                optimizer_of(s),
                f"{s['spec']['learning_rate']:g}",
                pct(1 - sp(s)),
                pct(1 - sp(s, 0.0)),
                pct(1 - sp(s, 0.0, "fp32"), 2),
                pct(s["bf16_rank"]["mean_rank_ratio"]),
                pct(o.get("energy_rank_90_ratio")),
                pct(a["accuracy"]) if a else "–",
                pts(a["accuracy"] - th["accuracy"]) if a else "–",
            ]
        )
    md.append(
        md_table(
            [
                "stage",
                "optimizer",
                "lr",
                "updated bf16 @1e-5",
                "bf16 @0",
                "fp32 masters @0",
                "mean rank",
                "90%-energy rank",
                f"{tsk} acc",
                f"gain (θ0 {pct(th['accuracy'])})",
            ],
            rows,
        )
    )
    md.append("")
    md.append(
        "Updated = density, the share of parameters that changed (100% − sparsity). Ranks: mean over the 2-D non-norm "
        "matrices as a share of min(m, n); the 90%-energy rank is the fewest singular directions of Δ holding 90% of "
        "‖Δ‖² (next section)."
    )
    return md


def spectral_markdown(results: dict) -> list[str]:
    """Where the update points: the pooled spectral metrics of the RL/SFT pairs, the SGD stages and a random update."""
    st = results["stages"]
    pairs = spectral_pairs(results)
    if not pairs:
        return []
    k = st[pairs[0][0]]["spectral"]["top_k"]
    blocks = [min(r["shape"]) for r in st[pairs[0][0]]["spectral"]["matrices"] if r.get("layer") is not None]
    side = min(blocks) if blocks else None
    ref = ((results.get("spectral_reference") or {}).get("random_delta") or {}).get("overall")
    md = ["", "## Where the update points", ""]
    md.append(
        f"For every 2-D non-norm matrix (W0 from θ0, W1 from the stage's bf16 checkpoint, Δ = W1 − W0 rounded in bf16, "
        f"as `rlsubnet compare --spectral` computes them), with top-k = {k}"
        + (
            f": {k / side:.0%} of the {side}-wide side of the block matrices, so that the chance share of a one-sided "
            f"principal subspace (k/m, k/n) is at most {k / side:.2%} there. "
            if side
            else ". "
        )
        + "Numerical rank: singular values of Δ above torch.linalg.matrix_rank's tolerance; stable rank ‖Δ‖_F²/‖Δ‖_2²; "
        "effective rank exp(entropy of σ_i/Σσ); 90% / 99%-energy rank: the fewest singular directions holding that "
        "share of ‖Δ‖_F²; principal energy: the share of ‖Δ‖_F² inside W0's top-k left and right singular subspaces, "
        "as a multiple of what an update of i.i.d. entries puts there (k²/(m·n)); angle: the largest principal angle "
        "between W0's and W1's top-k subspaces, left and right averaged; drift: the relative change of W0's top-k "
        "singular values. Ranks as a share of min(m, n); everything is the mean over the matrices (definitions: "
        "docs/concepts.md). The last row is an i.i.d. Gaussian Δ on θ0's matrices, for scale. RL and SFT are "
        "compared at one learning rate, where only the algorithm and its training rows differ."
    )
    md.append("")
    names: list[str] = []
    for a, b, _ in pairs:
        names += [a, b]
    names += [n for n in _sgd_names(results) if spectral(st[n])]
    names += [n for n in ("dpo",) if n in st and spectral(st[n])]
    rows = []
    for n in names:
        o = spectral(st[n])
        rows.append(
            [
                f"`{n}`",
                f"{st[n]['spec']['learning_rate']:g} ({optimizer_of(st[n])})",
                pct(o["numerical_rank_ratio"]),
                _f(o["stable_rank"], ".2f"),
                pct(o["effective_rank_ratio"]),
                pct(o["energy_rank_90_ratio"]),
                pct(o["energy_rank_99_ratio"]),
                _f(o["principal_energy_over_chance"], ".1f", "×"),
                pct(o["principal_energy_left"]),
                _f(angle(o), ".3g", "°"),
                _f(o["spectral_drift"], ".2e"),
            ]
        )
    if ref:
        rows.append(
            [
                "i.i.d. Δ (reference)",
                "–",
                pct(ref["numerical_rank_ratio"]),
                _f(ref["stable_rank"], ".2f"),
                pct(ref["effective_rank_ratio"]),
                pct(ref["energy_rank_90_ratio"]),
                pct(ref["energy_rank_99_ratio"]),
                _f(ref["principal_energy_over_chance"], ".1f", "×"),
                pct(ref["principal_energy_left"]),
                "–",
                "–",
            ]
        )
    md.append(
        md_table(
            [
                "stage",
                "lr (optimizer)",
                "numerical rank",
                "stable rank",
                "effective rank",
                "90%-energy rank",
                "99%-energy rank",
                "principal energy",
                "left share",
                "angle",
                "drift",
            ],
            rows,
        )
    )
    md.append("")
    md.append("Per module (mean over the layers): principal energy (× a random update's) / angle (°).")
    md.append("")
    kinds = [m["module"] for m in st[pairs[0][0]]["spectral"]["modules"]]
    mrows = []
    for n in [x for a, b, _ in pairs for x in (a, b)]:
        by = {m["module"]: m for m in st[n]["spectral"]["modules"]}
        cells = []
        for kind in kinds:
            m = by.get(kind)
            if m is None or not m.get("principal_energy_chance"):
                cells.append("–")
                continue
            pe = m["principal_energy"] / m["principal_energy_chance"] if m.get("principal_energy") is not None else None
            cells.append(f"{_f(pe, '.1f', '×')} / {_f(angle(m), '.2g', '°')}")
        mrows.append([f"`{n}` (lr {st[n]['spec']['learning_rate']:g})", *cells])
    md.append(md_table(["stage", *kinds], mrows))
    md.append("")
    md.append(
        "Verdicts: claims `pnt-rotation`, `pnt-drift`, `pnt-off-principal` and `effective-low-rank` in the claims "
        f"table ('small under RL' = at most {CRITERIA['spectral_smaller_at_most']:g}× SFT's; 'off the principal "
        f"directions' = at most {CRITERIA['off_principal_at_most']:g}× a random update's share; 'effectively low "
        f"rank' = 90% of the energy in at most {CRITERIA['energy_rank_90_at_most']:.0%} of the directions)."
    )
    return md


def fig_where_the_update_points(results: dict):
    """Rotation, drift and principal energy of RL against SFT at each learning rate (and under SGD)."""
    from rlsubnet.report.plots import pyplot

    plt = pyplot()
    st = results["stages"]
    groups = [(f"lr {lr:g} (AdamW)", a, b) for a, b, lr in spectral_pairs(results)]
    sgd = _sgd_names(results)
    rl_sgd = next((n for n in sgd if st[n]["spec"]["algorithm"] == "grpo"), None)
    sft_sgd = next((n for n in sgd if st[n]["spec"]["algorithm"] == "sft"), None)
    if rl_sgd and sft_sgd and spectral(st[rl_sgd]) and spectral(st[sft_sgd]):
        groups.append((f"lr {st[rl_sgd]['spec']['learning_rate']:g} (SGD)", rl_sgd, sft_sgd))
    panels = [
        ("largest principal angle (°)", angle),
        ("spectral drift", lambda o: o.get("spectral_drift")),
        ("principal energy (× random)", lambda o: o.get("principal_energy_over_chance")),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = range(len(groups))
    for ax, (label, key) in zip(axes, panels):
        for j, (color, who) in enumerate((("tab:blue", "RL (GRPO)"), ("tab:orange", "SFT"))):
            vals = [key(spectral(st[g[1 + j]])) or 0.0 for g in groups]
            ax.bar([i + (j - 0.5) * 0.38 for i in x], vals, width=0.38, color=color, label=who)
        ax.set_xticks(list(x), [g[0] for g in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
    axes[2].axhline(1.0, color="0.4", ls="--", lw=0.8, label="random update")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    c = results["config"]
    k = st[groups[0][1]]["spectral"]["top_k"] if groups else "?"
    fig.suptitle(
        "Where the update points: RL vs SFT at one learning rate (log scale)\n"
        f"size {c['size']} ({results['theta0']['parameters']:,} params), {c['steps']} steps, batch {c['batch_size']}, "
        f"seed {c['seed']}; bf16 checkpoints vs θ0, top-{k} singular subspaces, mean over 2-D non-norm matrices",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


SPECTRAL_FIGURES = {"where_the_update_points": ("Where the update points", fig_where_the_update_points)}
SPECTRAL_FIGURE_DATA = {
    "where_the_update_points": "stages.<name>.spectral.overall (principal_angle_left/right, spectral_drift, "
    "principal_energy_over_chance)"
}
