"""The report's PNG figures, drawn from the results dict; each names the settings it was produced with, and its
record (title, caption, where its numbers are in results.json) goes into results.json."""

from __future__ import annotations

import functools
import math

from rlsubnet._version import __version__
from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.records import RL_ALGOS, adamw_view, se, settings_of, sp, trained
from rlsubnet.lab.report.spectral_claims import spectral_pairs
from rlsubnet.lab.report.spectral_markdown import SPECTRAL_FIGURE_DATA, SPECTRAL_FIGURES
from rlsubnet.lab.report.subnetwork_figures import SUBNETWORK_FIGURE_DATA, SUBNETWORK_FIGURES, FigureFn
from rlsubnet.report import plots
from rlsubnet.report.plots import pyplot


def _titled(fig, ax, title: str, settings: str, **legend):
    """The end of a one-panel figure: the legend, and a title that names the settings."""
    ax.legend(fontsize=7, **legend)
    ax.set_title(f"{title}\n{settings}", fontsize=9)
    return fig


def _fig_sparsity_vs_paper(results):
    plt = pyplot()
    st = results["stages"]
    names = list(st)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, 0.35 * max(len(names), len(paper.TABLE1)) + 1.8), gridspec_kw={"width_ratios": [1, 1]}
    )
    ours = [100 * sp(st[n]) for n in names]
    ours0 = [100 * sp(st[n], 0.0) for n in names]
    colors = ["tab:blue" if st[n]["spec"]["algorithm"] in RL_ALGOS else "tab:orange" for n in names]
    y = range(len(names))
    ax1.barh(y, ours, color=colors)
    ax1.scatter(ours0, y, marker="|", color="black", s=120, label="atol 0 (bitwise)", zorder=3)
    for i, v in enumerate(ours):
        ax1.text(min(v + 1, 99), i, f"{v:.1f}", va="center", fontsize=7)
    ax1.set_yticks(list(y), [f"{n} (lr {st[n]['spec']['learning_rate']:g})" for n in names], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("sparsity (%), bf16, atol 1e-5")
    ax1.axvspan(*paper.RL_RANGE, color="tab:blue", alpha=0.08, label="paper: RL range")
    ax1.axvspan(*paper.SFT_RANGE, color="tab:orange", alpha=0.08, label="paper: SFT range")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.set_title("ours (blue: RL, orange: SFT)", fontsize=9)
    yp = range(len(paper.TABLE1))
    ax2.barh(yp, [v for _, _, v in paper.TABLE1], color="0.6")
    for i, (_, _, v) in enumerate(paper.TABLE1):
        ax2.text(min(v + 1, 99), i, f"{v:.1f}", va="center", fontsize=7)
    ax2.set_yticks(list(yp), [f"{m} ({a})" for m, a, _ in paper.TABLE1], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("sparsity (%), bf16, atol 1e-5")
    ax2.set_title("the paper's Table 1 (7B–671B models, their own runs)", fontsize=9)
    fig.suptitle(
        "Update sparsity per stage, beside the paper's Table 1\n" + settings_of(results, extra="bf16, atol 1e-5"),
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _fig_sft_vs_rl(results):
    """Bars grouped by learning rate: within a group, only the algorithm and the data differ."""
    plt = pyplot()
    st = results["stages"]
    c = results["config"]
    main_task = [n for n, s in st.items() if s["spec"]["task"] == c["task"] and trained(s)]
    lrs = sorted({st[n]["spec"]["learning_rate"] for n in main_task})
    fig, ax = plt.subplots(figsize=(max(7.5, 0.75 * len(main_task) + 2), 4.4))
    x = 0.0
    ticks, labels = [], []
    for lr in lrs:
        group = [n for n in main_task if st[n]["spec"]["learning_rate"] == lr]
        group.sort(key=lambda n: (st[n]["spec"]["algorithm"] not in RL_ALGOS, n))
        start = x
        for n in group:
            rl = st[n]["spec"]["algorithm"] in RL_ALGOS
            own = st[n]["spec"]["data"].startswith("own")
            ax.bar(
                x,
                100 * sp(st[n]),
                color="tab:blue" if rl else "tab:orange",
                hatch="//" if own else None,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.text(x, 100 * sp(st[n]) + 1, f"{100 * sp(st[n]):.1f}", ha="center", fontsize=8)
            ticks.append(x)
            labels.append(n)
            x += 1
        ax.text(
            (start + x - 1) / 2,
            101,
            f"lr {lr:g}" + (" (RL lr)" if lr == c["rl_lr"] else " (SFT lr)" if lr == c["sft_lr"] else ""),
            ha="center",
            fontsize=8,
            fontweight="bold",
        )
        x += 0.8
    ax.set_xticks(ticks, labels, rotation=25, ha="right", fontsize=8)
    ax.axhspan(*paper.RL_RANGE, color="tab:blue", alpha=0.08, label="paper: RL 68.5–96%")
    ax.axhspan(*paper.SFT_RANGE, color="tab:orange", alpha=0.12, label="paper: SFT 6–15%")
    ax.axhline(paper.RFT_SPARSITY, color="tab:green", linestyle=":", label="paper: RFT 91.2%")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Patch(facecolor="tab:blue", label="RL (GRPO, DPO)"),
        Patch(facecolor="tab:orange", label="SFT"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="trained on θ0's own samples"),
    ]
    ax.set(ylim=(0, 108), ylabel="sparsity (%), bf16, atol 1e-5")
    return _titled(
        fig,
        ax,
        "SFT vs RL at the usual and at matched learning rates",
        settings_of(results, main_task, "same steps, batch and data seed for every bar"),
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def _fig_sparsity_vs_step(results):
    plt = pyplot()
    st = results["stages"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for n, s in st.items():
        curve = s["sparsity_vs_step"]
        (line,) = ax1.plot(
            [p["step"] for p in curve], [100 * p["sparsity"]["1e-05"] for p in curve], marker=".", label=n
        )
        ax1.plot(
            [p["step"] for p in curve],
            [100 * p["sparsity"]["0.0"] for p in curve],
            linestyle=":",
            color=line.get_color(),
        )
        steps = s["step_to_step"]
        if steps:
            ax2.plot(
                [r["step"] for r in steps],
                [100 * r["sparsity_vs_previous_step"]["0.0"] for r in steps],
                color=line.get_color(),
                linewidth=0.9,
                label=n,
            )
    ax1.set_xlabel("optimizer step (snapshots)")
    ax1.set_ylabel("sparsity against θ0 (%)")
    ax1.set_title(
        f"against θ0, every {results['config']['snapshot_every']} steps (solid: atol 1e-5, dotted: atol 0)", fontsize=9
    )
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("sparsity against the previous step (%)")
    ax2.set_title("step to step: against the previous optimizer step, bitwise (atol 0)", fontsize=9)
    ax2.grid(True, alpha=0.3)
    fig.suptitle("Sparsity during training\n" + settings_of(results, extra="bf16"), fontsize=9)
    fig.tight_layout()
    return fig


def _fig_heatmap(results, name):
    s = results["stages"][name]
    g = s["grid"]
    return plots.heatmap(
        g["layers"],
        g["modules"],
        g["sparsity_1e-05"],
        f"Sparsity per layer and module: {name}",
        s["settings"] + "; bf16, atol 1e-5",
    )


def _fig_sparsity_vs_atol(results):
    st = results["stages"]
    series = []
    for n, s in st.items():
        atols = sorted(float(a) for a in s["sparsity"]["bf16"])
        series.append((n, atols, [s["sparsity"]["bf16"][repr(a)] for a in atols]))
    if "grpo" in st:
        atols = sorted(float(a) for a in st["grpo"]["sparsity"]["fp32"])
        series.append(("grpo compared in fp32", atols, [st["grpo"]["sparsity"]["fp32"][repr(a)] for a in atols]))
    ref = [(label, list(paper.TABLE6_ATOLS), [v / 100 for v in vals]) for label, vals in paper.TABLE6.items()]
    fig = plots.sparsity_vs_atol(
        series,
        "Sparsity vs tolerance (cf. the paper's Table 6; dashed: the paper)",
        settings_of(results, extra="bf16 unless noted"),
        reference=ref,
    )
    ax = fig.axes[0]
    cmap = pyplot().get_cmap("tab20")
    k = 0
    for line in ax.get_lines():
        label = line.get_label()
        if "(paper)" in label:
            line.set_color("0.35" if "Tulu" in label else "0.65")
        elif "fp32" in label:
            line.set_color("black")
            line.set_linestyle(":")
        else:
            line.set_color(cmap(2 * k % 20 + (2 * k // 20)))
            k += 1
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.set_size_inches(8.4, 4.4)
    return fig


def _bucket_mid(b):
    return math.sqrt(b["lo"] * b["hi"]) if b["lo"] > 0 and b["hi"] else (b["hi"] / 2 if b["hi"] else b["lo"] * 2)


def _fig_magnitude(results):
    plt = pyplot()
    st = results["stages"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    shown = [n for n in ("grpo", "dpo", "sft-matched", "grpo-sftlr", "sft", "rft") if n in st]
    for n in shown:
        buckets = [b for b in st[n]["magnitude_bf16"]["buckets"] if b["lo"] > 0 and b["hi"]]
        x = [_bucket_mid(b) for b in buckets]
        (line,) = ax.plot(x, [b["p_changed"]["0.0"] for b in buckets], marker="o", markersize=3, label=f"{n} (atol 0)")
        ax.plot(x, [b["p_changed"]["1e-05"] for b in buckets], linestyle="--", color=line.get_color(), linewidth=0.8)
    if "grpo" in st:
        buckets = [b for b in st["grpo"]["magnitude_fp32"]["buckets"] if b["lo"] > 0 and b["hi"]]
        ax.plot(
            [_bucket_mid(b) for b in buckets],
            [b["p_changed"]["0.0"] for b in buckets],
            color="black",
            linestyle=":",
            label="grpo fp32 masters (atol 0)",
        )
    T = results["config"]["steps"]
    for lr in sorted({st[n]["spec"]["learning_rate"] for n in shown}):
        ax.axvline(512 * lr * T, color="grey", linewidth=0.8)
        ax.text(512 * lr * T, 1.02, f"512·lr·T\n(lr {lr:g})", fontsize=6, ha="center", va="bottom")
    ax.axvline(2**-9, color="tab:red", linewidth=0.6, linestyle="-.")
    ax.text(2**-9, 0.45, "2^-9 ", fontsize=6, color="tab:red", ha="right")
    ax.set_xscale("log")
    ax.set(ylim=(-0.02, 1.12), xlabel="|w| in θ0 (bucket of one binade)", ylabel="P(changed)")
    return _titled(
        fig,
        ax,
        "P(weight changed | |w|): solid atol 0, dashed atol 1e-5 (below |w| = 2^-9 one bf16 step is < 1e-5)",
        settings_of(results, shown, "bf16 unless noted"),
        loc="lower left",
    )


def _fig_dynamics(results):
    plt = pyplot()
    st = results["stages"]
    rows = []
    for n, s in st.items():
        for label, key in (
            (f"every {s['snapshot_every']} steps", "decomposition_snapshots"),
            ("every step", "decomposition_every_step"),
        ):
            d = next((d for d in s.get(key, []) if d["atol"] == 1e-5), None)
            if d:
                rows.append(
                    (f"{n} ({label})", 100 * d["never_share"], 100 * d["returned_share"], 100 * d["final_share"])
                )
    p = paper.DYNAMICS_PRIME
    rows.append(("paper: PRIME", p["never"], p["returned"], p["final"]))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.6))
    y = range(len(rows))
    a = [r[1] for r in rows]
    b = [r[2] for r in rows]
    c = [r[3] for r in rows]
    ax.barh(y, a, color="0.8", label="never changed")
    ax.barh(y, b, left=a, color="tab:red", label="changed and returned")
    ax.barh(y, c, left=[i + j for i, j in zip(a, b)], color="tab:blue", label="final subnetwork")
    for i, r in enumerate(rows):
        ax.text(101, i, f"{r[1]:.1f} / {r[2]:.1f} / {r[3]:.1f}", va="center", fontsize=6)
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of all parameters (%), bf16, atol 1e-5")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3)
    ax.set_title(
        "Never changed / changed and returned / final subnetwork\n" + settings_of(results, extra="bf16, atol 1e-5"),
        fontsize=9,
        pad=22,
    )
    return fig


def _fig_bf16_vs_fp32(results):
    plt = pyplot()
    st = results["stages"]
    names = list(st)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(names)), 4.2))
    width = 0.2
    series = (
        ("bf16, atol 1e-5", "bf16", 1e-5),
        ("bf16, atol 0", "bf16", 0.0),
        ("fp32, atol 1e-5", "fp32", 1e-5),
        ("fp32, atol 0", "fp32", 0.0),
    )
    for j, (label, dt, a) in enumerate(series):
        ax.bar(
            [i + (j - 1.5) * width for i in range(len(names))],
            [100 * sp(st[n], a, dt) for n in names],
            width,
            label=label,
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 105), ylabel="sparsity (%)")
    title = "What bf16 hides: the same runs compared in bf16 and in fp32 (fp32 masters vs θ0)"
    return _titled(fig, ax, title, settings_of(results))


def _fig_pretrain(results):
    plt = pyplot()
    th = results["theta0"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    curve = th["curve"]
    for t in curve[0]["validation_accuracy"] if curve else {}:
        ax.plot(
            [p["step"] for p in curve],
            [100 * p["validation_accuracy"][t] for p in curve],
            marker=".",
            label=f"{t} (validation)",
        )
    ax.axhline(100 * th["spec"]["target_accuracy"], color="grey", linestyle="--", label="target")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("greedy accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    c = results["config"]
    ax.set_title(
        "Pretraining θ0 until validation accuracy reaches the target\n"
        + th["settings"]
        + f"; size {c['size']} ({th['parameters']:,} params); validation accuracy of the fp32 training weights, "
        "θ0 saved in bf16",
        fontsize=7,
        wrap=True,
    )
    return fig


def _fig_accuracy(results):
    plt = pyplot()
    st = results["stages"]
    tasks = list(results["theta0"]["accuracy"])
    names = ["θ0"] + list(st)
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(names)), 4.0))
    width = 0.8 / max(1, len(tasks))
    for j, t in enumerate(tasks):
        vals, errs = [], []
        for n in names:
            a = results["theta0"]["accuracy"][t]["bf16"] if n == "θ0" else st[n]["accuracy"].get(t, {}).get("bf16")
            vals.append(100 * a["accuracy"] if a else float("nan"))
            errs.append(200 * se(a["accuracy"], a["n"]) if a else 0)
        ax.bar(
            [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(names))],
            vals,
            width,
            yerr=errs,
            capsize=2,
            label=f"{t} (held out, n={results['theta0']['accuracy'][t]['bf16']['n']:,})",
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 100), ylabel="greedy accuracy (%) ± 2 SE")
    return _titled(fig, ax, "Held-out accuracy of the bf16 checkpoints", settings_of(results))


FIGURE_DATA = {
    "sparsity_vs_paper": "stages.<name>.sparsity.bf16 ('1e-05', '0.0'); the paper's Table 1 (lab.paper_numbers)",
    "sft_vs_rl": "stages.<name>.sparsity.bf16['1e-05'] and stages.<name>.spec.learning_rate",
    "sparsity_vs_step": "stages.<name>.sparsity_vs_step (snapshots) and stages.<name>.step_to_step (every step)",
    "sparsity_vs_atol": "stages.<name>.sparsity.bf16 / .fp32 for every atol; the paper's Table 6",
    "p_changed_vs_magnitude": "stages.<name>.magnitude_bf16 / magnitude_fp32",
    "dynamics": "stages.<name>.decomposition_snapshots / decomposition_every_step",
    "bf16_vs_fp32": "stages.<name>.sparsity.bf16 / .fp32",
    "accuracy": "theta0.accuracy and stages.<name>.accuracy",
    "pretrain": "theta0.curve",
    "heatmap": "stages.<name>.grid",
    **SUBNETWORK_FIGURE_DATA,
    **SPECTRAL_FIGURE_DATA,
}


FIGURES: dict[str, tuple[str, FigureFn]] = {
    "sparsity_vs_paper": ("Sparsity per stage beside the paper's Table 1", _fig_sparsity_vs_paper),
    "sft_vs_rl": ("SFT vs RL at usual and matched learning rates", _fig_sft_vs_rl),
    "sparsity_vs_step": ("Sparsity vs step (against θ0, and step to step)", _fig_sparsity_vs_step),
    "sparsity_vs_atol": ("Sparsity vs tolerance (Table 6)", _fig_sparsity_vs_atol),
    "p_changed_vs_magnitude": ("P(changed | |w|): the precision mechanism", _fig_magnitude),
    "dynamics": ("Never / returned / final decomposition", _fig_dynamics),
    "bf16_vs_fp32": ("bf16 vs fp32 comparison of the same runs", _fig_bf16_vs_fp32),
    "accuracy": ("Held-out accuracy before and after", _fig_accuracy),
    "pretrain": ("Pretraining curve of θ0", _fig_pretrain),
}

HEATMAP_STAGES = ("grpo", "dpo", "sft")


def figure_plan(results: dict) -> list[tuple[str, str, FigureFn]]:
    """(key, title, figure function of the results dict) of every figure this run has, in report order."""
    full, view = results, adamw_view(results)  # the paper's figures show the AdamW stages

    def on(data, fn):
        return functools.partial(lambda _, data, fn: fn(data), data=data, fn=fn)

    todo: list[tuple[str, str, FigureFn]] = [(k, title, on(view, fn)) for k, (title, fn) in FIGURES.items()]
    todo += [
        (f"heatmap_{n}", f"Layer × module sparsity: {n}", on(view, functools.partial(_fig_heatmap, name=n)))
        for n in HEATMAP_STAGES
        if n in view["stages"]
    ]
    sub = results.get("subnetwork") or {}
    for key, (title, fn) in SUBNETWORK_FIGURES.items():
        if (key == "subnetwork_identity" and sub.get("reruns")) or (key.startswith("overlap") and sub.get("overlap")):
            todo.append((key, title, on(view, fn)))
    if spectral_pairs(full):
        todo += [(k, title, on(full, fn)) for k, (title, fn) in SPECTRAL_FIGURES.items()]
    return todo


def render_some(results: dict, keys: list[str] | None = None) -> dict[str, tuple[bytes, dict]]:
    """file name -> (PNG bytes, record for results.json) of the figures ``keys`` (default: all), in plan order."""
    prov = {"rlsubnet_version": __version__, "config": results["config"]}
    out = {}
    for key, title, fn in figure_plan(results):
        if keys is not None and key not in keys:
            continue
        fig = fn(results)
        # The settings are part of every figure's title; the record repeats them for readers of results.json.
        caption = fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()
        data = FIGURE_DATA["heatmap" if key.startswith("heatmap_") else key]
        out[f"{key}.png"] = (
            plots.to_png(fig, {**prov, "figure": key}),
            {"title": title, "caption": caption, "data": data},
        )
    return out


def render_figures(results: dict, executor=None) -> dict[str, tuple[bytes, dict]]:
    """file name -> (PNG bytes, record for results.json), in report order. With ``executor`` (worker processes that
    are already running) its workers draw a share of the figures beside this process: the same bytes, sooner."""
    keys = [k for k, _, _ in figure_plan(results)]
    if executor is None or len(keys) < 2:
        return render_some(results)
    shares = executor._max_workers + 1
    groups = [keys[i::shares] for i in range(shares)]
    futures = [executor.submit(render_some, results, g) for g in groups[1:] if g]
    done = render_some(results, groups[0])
    for f in futures:
        done.update(f.result())
    return {f"{k}.png": done[f"{k}.png"] for k in keys}
