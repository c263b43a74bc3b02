"""report.md's sections on the subnetwork experiments: the re-runs (the paper's Table 3) and the masks'
overlap (Table 4). Every number in them is one of results.json."""

from __future__ import annotations

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.records import (
    ROLE_LABEL,
    acc_diff,
    ident,
    ident_at,
    md_table,
    pct,
    pts,
    rows_of,
    short_settings,
    sp,
)
from rlsubnet.lab.report.subnetwork_claims import subnetwork_differences, why_fp32


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
        f"`rlsubnet.train.attach_sparse` (sparse optimizer state: fp32 masters and moments of M's entries only; the full "
        f"gradient is clipped, then masked: the paper's order). Baselines: the same "
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
