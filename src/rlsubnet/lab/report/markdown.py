"""report.md, written from the results dict: the summary, the tables, the claims with their verdicts, the
subnetwork sections, the figures, the time and the files. Every number in it is one of results.json."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rlsubnet.lab.report.criteria import CRITERIA, criteria_sentence, fp32_dense, fp32_explains_sparsity
from rlsubnet.lab.report.prediction_markdown import prediction_markdown, prediction_summary_lines
from rlsubnet.lab.report.records import acc_diff, adamw_view, ident, md_table, pct, pts, rows_of, se, sp, trained
from rlsubnet.lab.report.spectral_markdown import optimizer_markdown, sgd_summary_lines, spectral_markdown
from rlsubnet.lab.report.subnetwork_markdown import subnetwork_markdown


def summary_lines(results: dict, claims: list[dict]) -> list[str]:
    """A few measured facts, each with its settings; no number here is not also in the tables below."""
    full, results = results, adamw_view(results)  # the SGD stages have their own line, at the end
    st = results["stages"]
    c = results["config"]
    out = []
    by_lr: dict[float, list[str]] = {}
    for n, s in st.items():
        if s["spec"]["task"] == c["task"] and trained(s):
            by_lr.setdefault(s["spec"]["learning_rate"], []).append(n)
    for lr in sorted(by_lr):
        names = by_lr[lr]
        vals = [sp(st[n]) for n in names]
        out.append(
            f"- At lr {lr:g} for {c['steps']} steps, every stage on {c['task']} keeps {pct(min(vals))}–{pct(max(vals))} "
            f"of its bf16 parameters unchanged at atol 1e-5 ({', '.join(f'{n} {pct(sp(st[n]))}' for n in names)})."
        )
    unchanged32 = {n: next(g for g in s["fp32"]["global"] if g["atol"] == 0.0) for n, s in st.items() if trained(s)}
    if unchanged32:
        worst = max(unchanged32, key=lambda n: unchanged32[n]["sparsity"])
        g = unchanged32[worst]
        line = (
            f"- Compared in fp32 (master weights against θ0), the stage with the most exactly-unchanged parameters "
            f"({worst}) has {g['numel'] - g['changed']:,} of {g['numel']:,} ({pct(g['sparsity'], 3)})"
        )
        if fp32_explains_sparsity(results):
            line += (
                ": the sparsity above is what rounding to bf16 lets through, not weights the optimizer left alone "
                f"(every stage has at most {pct(CRITERIA['fp32_dense_at_most'], 0)} of its masters bitwise unchanged "
                f"and at most {CRITERIA['fp32_at_most_of_bf16']:g}× its bf16 bitwise sparsity)."
            )
        else:
            bad = [n for n in unchanged32 if not fp32_dense(st[n])]
            rows = ", ".join(f"{n} {pct(sp(st[n], 0.0, 'fp32'))} in fp32 vs {pct(sp(st[n], 0.0))} in bf16" for n in bad)
            line += (
                f". Not every stage is dense in fp32 (dense = at most {pct(CRITERIA['fp32_dense_at_most'], 0)} of the "
                f"masters bitwise unchanged and at most {CRITERIA['fp32_at_most_of_bf16']:g}× the bf16 bitwise "
                f"sparsity): {rows}; there, part of the sparsity above is weights the optimizer left alone, not "
                "rounding."
            )
        out.append(line)
    th = results["theta0"]["accuracy"][c["task"]]["bf16"]
    for lr in sorted(by_lr):
        d = {n: st[n]["accuracy"][c["task"]]["bf16"]["accuracy"] - th["accuracy"] for n in by_lr[lr]}
        out.append(
            f"- Held-out {c['task']} accuracy (θ0 {pct(th['accuracy'])}, n = {th['n']:,}) after the lr {lr:g} stages: "
            f"{pts(min(d.values()))} to {pts(max(d.values()))} (two standard errors ≈ "
            f"{100 * 2 * math.sqrt(2) * se(th['accuracy'], th['n']):.1f} points)."
        )
    sub = results.get("subnetwork") or {}
    for alg, sec in (sub.get("reruns") or {}).items():
        srow = rows_of(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        base = "; ".join(
            f"{b['run']} {pct(ident(b, 1e-5))}"
            for b in sec["rows"]
            if b is not r and b["role"] != "predicted-mask re-run"
        )
        gap = acc_diff(sec, r, c["task"])
        out.append(
            f"- Re-training only {alg}'s subnetwork ({pct(sec['mask']['density'])} of the parameters; same seed and data "
            f"order) gives a model whose bf16 parameters equal θ_full's in {pct(ident(r, 1e-5))} of entries at atol "
            f"1e-5 and {pct(ident(r, 1e-4), 2)} at 1e-4 (paper: 90.5–94.0% and 100%); baselines at 1e-5: {base}."
            + (
                f" Held-out {c['task']} accuracy {pct(gap[2]['accuracy'])} vs θ_full {pct(gap[2]['accuracy'] - gap[0])}."
                if gap
                else ""
            )
        )
    ov = sub.get("overlap")
    if ov:
        seeds = [x for x in ov["comparisons"] if x["group"] == "seeds" and x["o1"] is not None]
        if seeds:
            out.append(
                "- Subnetworks of different seeds overlap at o1 "
                + ", ".join(f"{pct(x['o1'])} ({x['a']}/{x['b']})" for x in seeds)
                + " against a density chance of "
                + ", ".join(pct(x["chance_o1"]) for x in seeds)
                + " and a magnitude-matched chance of "
                + ", ".join(pct(x["magnitude_chance_o1"]) for x in seeds)
                + " (paper, DPO seeds: 60.5% vs 36.7%)."
            )
    out += sgd_summary_lines(full)
    out += prediction_summary_lines(full)
    verdicts: dict[str, list[str]] = {}
    for cl in claims:
        verdicts.setdefault(cl["verdict"], []).append(cl["id"])
    out.append("- Claims checked: " + "; ".join(f"{v}: {', '.join(ids)}" for v, ids in verdicts.items()) + ".")
    return out


def seeds_per_algorithm(results: dict) -> dict[str, int]:
    """For each stage that has full runs with other seeds: the number of distinct seeds of its full runs."""
    runs = (results.get("subnetwork") or {}).get("runs") or {}
    out: dict[str, set] = {}
    for r in runs.values():
        if r["role"] == "full run, another seed" and r["of"] in results["stages"]:
            out.setdefault(r["of"], {results["stages"][r["of"]]["spec"]["seed"]}).add(r["spec"]["seed"])
    return {of: len(seeds) for of, seeds in out.items()}


def commuted_twins_lines(results: dict) -> list[str]:
    """How 'held out' the held-out addition problems are: a+b is never trained on, but b+a may be."""
    twins = (results.get("commuted_twins") or {}).get("add")
    if not twins:
        return []
    n, k = twins["heldout_asymmetric"], twins["commuted_twin_in_train"]
    return [
        f"- The held-out addition problems are never trained on as written, but addition commutes: for {k:,} of the "
        f"{n:,} held-out problems a+b with a ≠ b ({k / n:.0%}), the training split holds b+a. "
        "Held-out accuracy measures unseen strings, not unseen pairs of operands."
    ]


def _threads(n: int) -> str:
    return f"{n} torch thread{'s' if n > 1 else ''}"


def render_markdown(results: dict, claims: list[dict], figure_files: Sequence[str]) -> str:
    c = results["config"]
    th = results["theta0"]
    st = results["stages"]
    tim = results["timings"]
    v = results["versions"]
    tasks = list(th["accuracy"])
    md = [f"# rlsubnet demo: RL finetunes small subnetworks? Measured on a {th['parameters']:,}-parameter model", ""]
    md.append(
        f"A {c['size']} Llama-style model ({th['parameters']:,} parameters, character-level tokenizer) was pretrained from "
        f"scratch on {' and '.join(tasks)} and saved in bf16 as θ0. From θ0, {len(st)} finetuning stages ran with TRL "
        f"{v['trl']}'s real trainers ({', '.join(sorted({s['trainer'] for s in st.values()}))}), each {c['steps']} optimizer "
        f"steps with fp32 master weights, seed {c['seed']}. Every stage's bf16 checkpoint was compared with θ0 by the "
        f"rlsubnet compare engine. "
        + (
            f"Then {len(results['subnetwork']['runs'])} more runs for the subnetwork experiments (the paper's Tables 3 and "
            "4): GRPO and DPO re-run from θ0 on their own subnetwork and on a random mask of equal density, and with other "
            "seeds. "
            if (results.get("subnetwork") or {}).get("runs")
            else ""
        )
        + "Everything below was measured in this run; the paper's numbers are labelled as such. "
        "One small model, short runs: treat differences of a point or two as noise."
    )
    md.append("")
    md.append(
        f"Versions: rlsubnet {v['rlsubnet']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"datasets {v['datasets']}, accelerate {v['accelerate']}; {_threads(c.get('threads', 1))} per finetuning stage, "
        f"{_threads(th['spec'].get('threads', 1))} in pretraining."
    )
    md += ["", "## In short", ""]
    md += summary_lines(results, claims)
    md += ["", "## θ0", ""]
    reached = (
        f"reached the target at step {th['reached_at_step']}"
        if th["target_reached"]
        else f"**did not reach the target** within {th['steps_done']} steps: RL results below start from a weaker base"
    )
    md.append(
        f"{th['settings']}. Pretraining {reached}. Held-out greedy accuracy of the bf16 θ0: "
        + ", ".join(
            f"{t} {pct(th['accuracy'][t]['bf16']['accuracy'])} (n = {th['accuracy'][t]['bf16']['n']:,})" for t in tasks
        )
        + ". The held-out problems are never trained on (nor used to stop pretraining: a separate validation split is)."
    )
    s = results["samples"]
    md.append("")
    md.append(
        f"θ0's own samples ({s['settings']}): sample accuracy {pct(s['sample_accuracy'])}; "
        f"{s['prompts_with_a_correct_sample']:,} prompts with a correct sample (rejection-sampling FT data), "
        f"{s['prompts_with_correct_and_incorrect']:,} with a correct and an incorrect one (DPO pairs)."
    )

    md += ["", "## Results", ""]
    headers = ["stage", "what", "lr", "sparsity bf16 @1e-5", "bf16 @0", "fp32 @1e-5", "fp32 @0", "mean rank"]
    headers += [f"{t} acc (θ0 {pct(th['accuracy'][t]['bf16']['accuracy'])})" for t in tasks]
    headers.append(f"{tasks[0]} acc, fp32 masters")
    rows = []
    for n, x in st.items():
        row = [
            f"`{n}`",
            x["description"],
            f"{x['spec']['learning_rate']:g}",
            pct(sp(x)),
            pct(sp(x, 0.0)),
            pct(sp(x, 1e-5, "fp32")),
            pct(sp(x, 0.0, "fp32")),
            pct(x["bf16_rank"]["mean_rank_ratio"]),
        ]
        row += [pct(x["accuracy"][t]["bf16"]["accuracy"]) if t in x["accuracy"] else "–" for t in tasks]
        row.append(pct(x["accuracy"][tasks[0]]["fp32_master"]["accuracy"]) if tasks[0] in x["accuracy"] else "–")
        rows.append(row)
    md.append(md_table(headers, rows))
    md.append("")
    md.append(
        "Sparsity = share of parameters unchanged (|Δ| ≤ atol; atol 0 is bitwise); density = 100% − sparsity. "
        "bf16: the saved bf16 checkpoints, as the paper measured; fp32: the fp32 master weights against θ0 (which "
        "they start from exactly). Mean rank: rank(ΔW) / min(m, n) averaged over 2-D non-norm matrices. "
        "Accuracy: greedy, exact match, on the held-out split, of the bf16 checkpoint (and, last column, of the "
        "fp32 master weights before rounding to bf16)."
    )
    md.append("")
    md.append("Settings per stage:")
    md.append("")
    for n, x in st.items():
        d = x["data"]
        md.append(
            f"- `{n}`: {x['settings']}; {d['rows']:,} training rows ({d['unique_prompts']:,} distinct prompts, "
            f"{d['epochs']:.2f} passes over a pool of {d['pool']:,}); optimizer {x['optimizer'].get('class', '?').split('.')[-1]} "
            f"(weight decay {x['spec']['weight_decay']:g})."
        )

    md += ["", "## The paper's claims, checked", ""]
    md.append(criteria_sentence(results))
    md.append("")
    md.append(
        md_table(
            ["claim", "paper", "ours", "verdict"],
            [[c_["claim"], c_["paper"], c_["ours"] + f" — {c_['why']}", f"**{c_['verdict']}**"] for c_ in claims],
        )
    )
    disagreements = [c_ for c_ in claims if c_["verdict"] in ("differs", "partly agrees", "gap remains", "partly")]
    if disagreements:
        md += ["", "Where we differ from the paper, in plain words:", ""]
        for c_ in disagreements:
            md.append(f"- {c_['claim']} Ours: {c_['ours']}. {c_['why'][0].upper() + c_['why'][1:]}")

    md += subnetwork_markdown(results)
    md += prediction_markdown(results)
    md += optimizer_markdown(results)
    md += spectral_markdown(results)

    md += ["", "## Figures", ""]
    for f in figure_files:
        md.append(f"![{f}](figures/{f})")
        md.append("")

    md += ["## Time", ""]
    mach = results.get("machine") or {}
    jobs = mach.get("jobs", 1)
    trows = []
    for k, t in tim.items():
        if k in ("total", "finetuning_phase"):
            continue
        where = "worker process" if "worker_pid" in t else ("–" if t.get("reused") else "main process")
        trows.append(
            [
                k,
                "reused" if t.get("reused") else f"{t['wall_s']:.1f}",
                "" if t.get("reused") else f"{t['cpu_s']:.1f}",
                where,
            ]
        )
    md.append(md_table(["stage", "wall (s)", "cpu (s)", "where"], trows))
    md.append("")
    if "finetuning_phase" in tim:
        ph = tim["finetuning_phase"]
        threads = mach.get("threads_per_stage", 1)
        if jobs > 1:
            md.append(
                f"The finetuning stages ran up to {jobs} at a time (`--jobs {jobs}`), each in its own worker process "
                f"with {threads} torch thread{'s' if threads > 1 else ''}: the phase took {ph['wall_s']:.0f} s wall, "
                "less than the sum of the stages' own wall times, which grow when stages share the CPU. Which process "
                "runs a stage never changes its numbers (same spec, same thread count: same bits)."
            )
        else:
            md.append(
                f"The finetuning stages ran one after another in the main process (`--jobs 1`, {threads} torch "
                f"thread{'s' if threads > 1 else ''}): {ph['wall_s']:.0f} s wall."
            )
    if "total" in tim:
        md.append("")
        md.append(
            f"Total wall time of this invocation: {tim['total']['wall_s']:.0f} s (stages marked reused were "
            f"finished by an earlier run and not recomputed); CPU time {tim['total']['cpu_s']:.0f} s, worker processes "
            "included."
        )
    if mach:
        la0, la1 = mach.get("loadavg_start"), mach.get("loadavg_end")
        md.append("")
        md.append(
            f"Machine: {mach.get('cpu_count')} CPU cores; load average (1, 5, 15 min) "
            + (f"{la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f} at the start" if la0 else "")
            + (f", {la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f} at the end" if la1 else "")
            + " (this run's own processes included): other jobs on the machine lengthen every wall time above."
        )
    md += ["", "## What this run does not show", ""]
    seed_counts = seeds_per_algorithm(results)
    spread = (
        (
            "run-to-run spread is measured only for "
            + " and ".join(f"{of.upper()} ({k} seed{'s' if k > 1 else ''})" for of, k in seed_counts.items())
            + ", in the subnetwork sections"
        )
        if seed_counts
        else "run-to-run spread is not measured"
    )
    md += [
        f"- One seed ({c['seed']}) for every stage of the results table; {spread}. Same seed, same machine and thread count: same "
        "numbers.",
        f"- A {th['parameters']:,}-parameter model and {c['steps']}-step runs, against the paper's 7B–671B models and full "
        "training runs. Sparsity depends on lr × steps and on weight magnitudes (see the P(changed | |w|) figure), so our "
        "absolute numbers transfer to no other setting.",
        "- SFT here trains on reference answers of the same task θ0 was pretrained on, not on another model's outputs.",
        f"- The subnetwork re-runs repeat the paper's protocol on {c['steps']}-step runs of a {th['parameters']:,}-parameter "
        "model; the paper's runs are full training runs of 7B-scale models. The overlap 'algorithm' comparison here is GRPO "
        "vs DPO (the paper: DPO vs PRIME), and 'data' is two tasks (two kinds of prompts), not two preference data sets.",
        *commuted_twins_lines(results),
        "",
        "## Files",
        "",
        "- `results.json`: every number above and the data of every figure.",
        "- `stages/<name>/`: per stage `stage.json`, the bf16 checkpoint `model/`, `master-fp32.safetensors`, `snapshots/`, "
        "`steps.json`, `data.jsonl` (training rows in order), `log.jsonl` (trainer logs).",
        "- `masks/*.mask.safetensors`: the subnetworks (bf16, atol 1e-5, against θ0) and the random masks, as `rlsubnet mask` "
        "writes them: `rlsubnet overlap masks/grpo.mask.safetensors masks/dpo.mask.safetensors --base "
        "stages/pretrain/model` reproduces a row of the overlap table.",
    ]
    return "\n".join(md) + "\n"
