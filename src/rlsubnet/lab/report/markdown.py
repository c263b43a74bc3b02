"""report.md, written from the results dict: the summary, the tables, the claims with their verdicts, the
subnetwork sections, the figures, the time and the files. Every number in it is one of results.json."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.criteria import CRITERIA, criteria_sentence, fp32_dense, fp32_explains_sparsity
from rlsubnet.lab.report.records import (
    ROLE_LABEL,
    acc_diff,
    ident,
    ident_at,
    md_table,
    pct,
    pts,
    rows_of,
    se,
    short_settings,
    sp,
    trained,
)
from rlsubnet.lab.report.subnetwork_claims import subnetwork_differences, why_fp32


def summary_lines(results: dict, claims: list[dict]) -> list[str]:
    """A few measured facts, each with its settings; no number here is not also in the tables below."""
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
        base = "; ".join(f"{b['run']} {pct(ident(b, 1e-5))}" for b in sec["rows"] if b is not r)
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
    verdicts: dict[str, list[str]] = {}
    for cl in claims:
        verdicts.setdefault(cl["verdict"], []).append(cl["id"])
    out.append("- Claims checked: " + "; ".join(f"{v}: {', '.join(ids)}" for v, ids in verdicts.items()) + ".")
    return out


def subnetwork_markdown(results: dict) -> list[str]:
    """The report's sections for the paper's Tables 3 and 4."""
    sub = results.get("subnetwork")
    if not sub:
        return []
    c = results["config"]
    tsk = c["task"]
    md = ["", "## Subnetwork re-runs (the paper's Table 3)", ""]
    dpo_beta = results["stages"].get("dpo", {}).get("spec", {}).get("beta")
    md.append(
        f"For GRPO and DPO, the subnetwork M of the full run is the set of entries of its bf16 checkpoint that differ from "
        f"θ0 by more than 1e-5 (the compare engine's test on bf16 values; files in `masks/`). Each re-run starts from θ0 "
        f"with the full run's exact spec (lr {c['rl_lr']:g}, {c['steps']} steps, batch {c['batch_size']}, seed {c['seed']}, "
        f"the same training rows in the same order and, for GRPO, the same sampling RNG; clip {c['clip']:g}; AdamW "
        f"single-tensor, no weight decay; fp32 masters), its optimizer restricted to the mask by "
        f"`rlsubnet.train.attach_mask` (the full gradient is clipped, then masked: the paper's order). Baselines: the same "
        f"re-run on a random mask with M's count in every tensor (per-tensor scope, seed {c['seed']}), and full runs with "
        f"other seeds (the seed sets GRPO's sampling and the data order). DPO uses β {dpo_beta:g} (the demo's `dpo_beta`, "
        f"the same default as `rlsubnet train dpo`). Identity = share of entries with |θ_full − θ| ≤ atol on the bf16 "
        f"checkpoints, overall and among M's entries; accuracy: greedy exact match on the held-out split."
    )
    md.append("")
    headers = [
        "algorithm",
        "run",
        "what",
        "identity @0",
        "@1e-5",
        "@1e-4",
        "inside M @0",
        "@1e-5",
        "@1e-4",
        f"{tsk} acc",
        "Δ acc vs θ_full",
        "fp32 masters outside the trained mask",
    ]
    rows = []
    for alg, sec in sub["reruns"].items():
        fa = sec["full_accuracy"][tsk]["bf16"]
        rows.append(
            [
                alg.upper(),
                f"`{sec['full']}` (θ_full)",
                f"full run; M has density {pct(sec['mask']['density'])} "
                f"({sec['mask']['changed']:,} of {sec['mask']['numel']:,})",
                "100%",
                "100%",
                "100%",
                "100%",
                "100%",
                "100%",
                pct(fa["accuracy"]),
                "",
                "",
            ]
        )
        for r in sec["rows"]:
            d = acc_diff(sec, r, tsk)
            fm = r.get("frozen_masters")
            rows.append(
                [
                    alg.upper(),
                    f"`{r['run']}`",
                    ROLE_LABEL.get(r["role"], r["role"]),
                    pct(ident(r, 0.0)),
                    pct(ident(r, 1e-5)),
                    pct(ident(r, 1e-4), 2),
                    pct(ident(r, 0.0, True)),
                    pct(ident(r, 1e-5, True)),
                    pct(ident(r, 1e-4, True), 2),
                    pct(r["accuracy"][tsk]["bf16"]["accuracy"]),
                    f"{pts(d[0])} (± {100 * d[1]:.1f})" if d else "–",
                    (
                        f"{fm['frozen_entries_checked'] - fm['frozen_entries_moved']:,} of {fm['frozen_entries_checked']:,} "
                        "bit-identical to θ0"
                    )
                    if fm
                    else "– (full run)",
                ]
            )
    for alg, vals in paper.TABLE3.items():
        rows.append(
            [
                f"paper: {alg}",
                "θ_sub",
                "7B-scale models, their runs",
                "–",
                f"{vals[1e-5]}%",
                f"{vals[1e-4]:g}%",
                "–",
                "–",
                "–",
                "–",
                "equal or better",
                "–",
            ]
        )
    md.append(md_table(headers, rows))
    md.append("")
    md.append(
        "Two standard errors of an accuracy difference are given in brackets (independent binomials; conservative, "
        "as the same problems are used). Inside M: identity among the full run's subnetwork entries only (outside M, "
        "a re-run on M is θ0 and θ_full's bf16 checkpoint is within 1e-5 of θ0, M's own test, so from atol 1e-5 on "
        "identity there is 100% by construction; at atol 0 the changes of at most 1e-5 that M leaves out count; a "
        "random-mask re-run and another seed can differ anywhere). The fp32 check compares every master weight outside the "
        "mask the run trained on with θ0's value, bit for bit, after training."
    )
    extra_lines = []
    for alg, sec in sub["reruns"].items():
        srow = rows_of(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        f32 = {b["run"]: ident_at(b, 1e-5, key="identity_fp32_masters") for b in sec["rows"]}
        f32_4 = [ident_at(b, 1e-4, key="identity_fp32_masters") for b in sec["rows"]]
        others = [f32[b["run"]] for b in sec["rows"] if b["role"] == "full run, another seed"]
        closer = others and f32[r["run"]] > max(others)
        line = (
            f"- Compared in fp32 (the master weights before rounding to bf16), identity with `{sec['full']}`'s masters at "
            "1e-5: "
            + ", ".join(f"`{n}` {pct(v)}" for n, v in f32.items())
            + f"; at 1e-4, {pct(min(f32_4))}–{pct(max(f32_4))}. "
            + (
                "In fp32 the subnetwork re-run is also the closest to θ_full."
                if closer
                else "In fp32 the subnetwork re-run is *not* closer to θ_full than another seed's full run"
                + why_fp32(results, sec)
            )
        )
        if alg == "grpo":
            if r.get("first_step_reward_differs"):
                line += (
                    f" GRPO's sampled completions first differ from the full run's at step {r['first_step_reward_differs']} "
                    "(the mean reward logged there differs); from then on the two runs train on different samples."
                )
            else:
                line += (
                    " Its logged rewards equal the full run's at every step (the same sampled completions throughout)."
                )
        extra_lines.append(line)
    seeds = [(n, r) for n, r in (sub.get("runs") or {}).items() if r["role"] == "full run, another seed"]
    if seeds:
        extra_lines.append(
            "- Run-to-run spread of the full runs' sparsity (bf16, atol 1e-5): "
            + "; ".join(
                f"{of} {pct(sp(results['stages'][of]))}, "
                + ", ".join(f"{n} {pct(r['sparsity']['bf16']['1e-05'])}" for n, r in seeds if r["of"] == of)
                for of in dict.fromkeys(r["of"] for _, r in seeds)
                if of in results["stages"]
            )
            + "; held-out "
            f"{tsk} accuracy " + ", ".join(f"{n} {pct(r['accuracy'][tsk]['bf16']['accuracy'])}" for n, r in seeds) + "."
        )
    if extra_lines:
        md += [""] + extra_lines
    if sub.get("skipped"):
        md += [""] + [f"- `{n}` did not run: {why}." for n, why in sub["skipped"].items()]

    ov = sub.get("overlap")
    plain = subnetwork_differences(results)
    if plain:
        md += ["", "Where the subnetwork results differ from the paper's, in plain words:", ""] + plain
    if ov:
        md += ["", "## Subnetwork overlap (the paper's Table 4)", ""]
        md.append(
            "Masks as above (bf16, atol 1e-5, against θ0) for every stage listed; o1 = |A∩B| / |A|, o2 = |A∩B| / |B|. "
            "Density chance (the paper's): o1 = density(B), o2 = density(A). Magnitude-matched chance: if each "
            "parameter's chance of changing depended only on the bf16 exponent of its |w| in θ0 (one bucket per power of "
            "two), estimated from the two masks themselves. Reach = (|A∩B| − chance) / (min(|A|, |B|) − chance): how far "
            "the overlap sits from the density chance (0) to the most the two densities allow (1), the same for o1 and o2; "
            "it makes overlaps with a dense mask comparable. 'Explained by |w|' = (magnitude chance − density chance) / "
            "(o1 − density chance). The paper's Table 4 is DPO on Tulu-3-8B-SFT (its 'algorithm' row: DPO vs PRIME)."
        )
        md.append("")
        headers = [
            "comparison",
            "A",
            "B",
            "o1",
            "o2",
            "Jaccard",
            "density chance o1 / o2",
            "magnitude chance o1 / o2",
            "reach",
            "o1 ÷ magnitude chance",
            "explained by |w|",
            "paper: o1 / o2 (chance; reach)",
        ]

        def num(x, fmt):
            return "–" if x is None else format(x, fmt)

        rows = []
        for cmp_ in ov["comparisons"]:
            pp = cmp_.get("paper")
            rows.append(
                [
                    f"{cmp_['group']}: {cmp_['what']}",
                    f"`{cmp_['a']}` ({pct(cmp_['density_a'])})",
                    f"`{cmp_['b']}` ({pct(cmp_['density_b'])})",
                    pct(cmp_["o1"]),
                    pct(cmp_["o2"]),
                    pct(cmp_["jaccard"]),
                    f"{pct(cmp_['chance_o1'])} / {pct(cmp_['chance_o2'])}",
                    f"{pct(cmp_['magnitude_chance_o1'])} / {pct(cmp_['magnitude_chance_o2'])}",
                    num(cmp_.get("reach"), ".2f"),
                    f"{num(cmp_['o1_over_magnitude_chance'], '.2f')}×",
                    pct(cmp_["magnitude_explains_share_of_excess"], 0),
                    (
                        f"{100 * pp['o1']:.1f} / {100 * pp['o2']:.1f} ({100 * pp['chance_o1']:.1f} / {100 * pp['chance_o2']:.1f}; "
                        f"{pp['reach']:.2f}) — {pp['what']}"
                    )
                    if pp
                    else "",
                ]
            )
        md.append(md_table(headers, rows))
        md.append("")
        md.append(
            "Density in brackets. Settings of each mask's stage: "
            + "; ".join(
                f"`{label}` {short_settings(results, label) or (ov['settings']['masks'][i].get('kind') or '')}"
                for i, label in enumerate(ov["labels"])
            )
            + f"; all {c['steps']} steps, batch {c['batch_size']}, from the same θ0. "
            "The random mask is a control: its overlap with any mask should sit at the density chance."
        )
        seed_pair = next((x for x in ov["comparisons"] if x["group"] == "seeds"), None)
        if seed_pair and seed_pair.get("modules"):
            md += [
                "",
                f"Per module, {seed_pair['what']} (`{seed_pair['a']}` vs `{seed_pair['b']}`; every pair's per-layer and per-module "
                "rows are in results.json, `subnetwork.overlap.pairs`):",
                "",
            ]
            mrows = [
                [
                    m["module"],
                    f"{m['numel']:,}",
                    pct(m["density_a"]),
                    pct(m["o1"]),
                    pct(m["chance_o1"]),
                    pct(m.get("magnitude_chance_o1")),
                ]
                for m in seed_pair["modules"]
            ]
            md.append(
                md_table(
                    [
                        "module",
                        "entries",
                        f"density of {seed_pair['a']}",
                        "o1",
                        "density chance o1",
                        "magnitude chance o1 (within the module)",
                    ],
                    mrows,
                )
            )
    return md


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
        f"datasets {v['datasets']}, accelerate {v['accelerate']}; {v['torch_threads']} torch threads."
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
