"""The paper's claims about its subnetworks (Tables 3 and 4) and the baselines later work asks for, checked against
this run's measurements; and where the subnetwork results differ from the paper's, in plain words."""

from __future__ import annotations

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.criteria import CRITERIA, dense_in_fp32
from rlsubnet.lab.report.records import acc_diff, algo_of, full_gain, ident, ident_at, pct, pts, rows_of, sp, spec_of


def assess_subnetworks(results: dict) -> list[dict]:
    """The paper's claims 3 and 4 (Tables 3 and 4), and the baselines later work asks for."""
    sub = results.get("subnetwork")
    out: list[dict] = []
    if not sub:
        return out
    tsk = results["config"]["task"]
    paper3 = paper.TABLE3
    reruns = sub.get("reruns") or {}
    verdicts, parts, whys = [], [], []
    for alg, sec in reruns.items():
        srow = rows_of(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        i5, i4 = ident_at(r, 1e-5), ident_at(r, 1e-4)
        d = acc_diff(sec, r, tsk)
        ok5 = i5 >= CRITERIA["identity_1e-5"]
        ok4 = i4 >= 1 - CRITERIA["identity_1e-4_points"] / 100
        ok_acc = d is None or d[0] >= -d[1]
        verdicts.append((ok5, ok4, ok_acc))
        acc_txt = f", {tsk} accuracy {pts(d[0])} vs θ_full (± {100 * d[1]:.1f})" if d else ""
        parts.append(f"{alg}: {pct(i5)} identical at 1e-5, {pct(i4, 2)} at 1e-4, {pct(ident(r, 0.0))} bitwise{acc_txt}")
        whys.append(
            f"{alg}: 1e-5 {'meets' if ok5 else 'misses'} the bar, 1e-4 {'meets' if ok4 else 'misses'} it, accuracy "
            f"{'is not lower' if ok_acc else 'is lower by more than two standard errors'}"
        )
    if verdicts:
        full_ok = [all(v) for v in verdicts]
        out.append(
            {
                "id": "subnetwork-suffices",
                "claim": "Training only the subnetwork (same data, hyperparameters and seed) reproduces θ_full: 94.0% (DPO) / "
                "90.5% (PRIME) of parameters identical at 1e-5, 100% at 1e-4, test accuracy equal or better (Table 3).",
                "paper": f"DPO {paper3['DPO'][1e-5]}% / PRIME {paper3['PRIME'][1e-5]}% at 1e-5; 100% at 1e-4",
                "ours": "; ".join(parts) + " (bf16 checkpoints; masks at atol 1e-5)",
                "verdict": "agrees"
                if all(full_ok)
                else "partly agrees"
                if any(any(v) for v in verdicts)
                else "differs",
                "why": f"reproduced = identity at 1e-5 at least {100 * CRITERIA['identity_1e-5']:.1f}% (the paper's lower figure), "
                f"at 1e-4 within {CRITERIA['identity_1e-4_points']:g} points of 100%, and accuracy not lower by more "
                "than two standard errors. " + "; ".join(whys) + ".",
            }
        )
    # baselines: a random mask of equal density and another seed
    parts, wins, whys = [], [], []
    for alg, sec in reruns.items():
        srow = rows_of(sec, "subnetwork re-run")
        if not srow:
            continue
        i_sub = ident_at(srow[0], 1e-5)
        for role in ("random-mask re-run", "full run, another seed"):
            for b in rows_of(sec, role):
                i_b = ident_at(b, 1e-5)
                win = i_sub - i_b > CRITERIA["beats_baseline_points"] / 100
                wins.append(win)
                parts.append(f"{alg}: θ_sub {pct(i_sub)} vs {b['run']} {pct(i_b)}")
        for b in rows_of(sec, "random-mask re-run"):
            d = acc_diff(sec, b, tsk)
            if d:
                whys.append(
                    f"{b['run']} reaches {pct(d[2]['accuracy'])} {tsk} accuracy, {pts(d[0])} vs θ_full (± {100 * d[1]:.1f})"
                )
    if wins:
        out.append(
            {
                "id": "subnetwork-beats-baselines",
                "claim": "Later work: the subnetwork claim must beat a random mask of equal density (which can train as well on "
                "small models) and the spread between seeds.",
                "paper": "no random-mask baseline in the paper",
                "ours": "identity with θ_full at 1e-5: " + "; ".join(parts),
                "verdict": "agrees" if all(wins) else "partly agrees" if any(wins) else "differs",
                "why": f"beats = identity at 1e-5 higher by more than {CRITERIA['beats_baseline_points']:g} points. Accuracy, the "
                "later work's measure: " + ("; ".join(whys) if whys else "not measured") + ".",
            }
        )
    ov = sub.get("overlap")
    if ov:
        comps = [
            c for c in ov["comparisons"] if c["group"] != "control" and c["o1"] is not None and c["o2"] is not None
        ]
        thr = CRITERIA["above_chance_reach"]

        def far(c):
            return (c.get("reach") or 0) >= thr

        groups: dict[str, list] = {}
        for c in comps:
            groups.setdefault(c["group"], []).append(c)
        parts, verdict_groups = [], []
        for g, cs in groups.items():
            n_far = sum(far(c) for c in cs)
            verdict_groups.append(n_far == len(cs))
            parts.append(
                f"{g}: "
                + ", ".join(
                    f"{c['a']}/{c['b']} {pct(c['o1'])}/{pct(c['o2'])} vs {pct(c['chance_o1'])}/"
                    f"{pct(c['chance_o2'])} (reach {c['reach']:.2f})"
                    for c in cs
                )
                + f" — {n_far} of {len(cs)} far above"
            )
        pr = [c["paper"] for c in ov["comparisons"] if c.get("paper")]
        paper_reach = [p_["reach"] for p_ in pr]
        out.append(
            {
                "id": "overlap",
                "claim": "Subnetworks from different seeds, data and algorithms overlap far above chance (Table 4).",
                "paper": "; ".join(f"{r[0]}: {r[2]}/{r[3]} vs chance {r[4]}/{r[5]}" for r in paper.TABLE4)
                + (f" (reach {min(paper_reach):.2f}–{max(paper_reach):.2f})" if paper_reach else ""),
                "ours": "o1/o2 vs density chance — " + "; ".join(parts),
                "verdict": "agrees" if all(verdict_groups) else "partly agrees" if any(verdict_groups) else "differs",
                "why": f"far above = reach at least {thr:.2f}, reach being how far the overlap sits from the paper's chance (0) "
                "to the most the two densities allow (1): (|A∩B| − chance) / (min(|A|, |B|) − chance), the same for o1 "
                "and o2. A dense mask (SFT at its usual lr) leaves little room above its density; reach measures how "
                "much of that room is used.",
            }
        )
        shares = [
            c["magnitude_explains_share_of_excess"]
            for c in comps
            if c["magnitude_explains_share_of_excess"] is not None and far(c)
        ]
        if shares:
            med = sorted(shares)[len(shares) // 2]
            beyond = [c for c in comps if c["o1_over_magnitude_chance"] and c["o1_over_magnitude_chance"] > 1.05]
            out.append(
                {
                    "id": "overlap-magnitude",
                    "claim": "Ours / later work: much of the overlap is explained by weight magnitude (bf16 rounding decides which "
                    "weights can change at all), not by a shared subnetwork.",
                    "paper": "not in the paper (its chance baseline is the density alone)",
                    "ours": f"the magnitude-matched chance accounts for {pct(min(shares), 0)}–{pct(max(shares), 0)} (median "
                    f"{pct(med, 0)}) of the excess of o1 over the density chance, over the {len(shares)} comparisons "
                    f"above chance; {len(beyond)} of {len(comps)} still overlap more than 5% beyond it",
                    "verdict": "agrees" if med >= 0.5 else "partly agrees" if med >= 0.25 else "differs",
                    "why": "explained share = (magnitude-matched chance − density chance) / (o1 − density chance); magnitude "
                    "explains 'much' when the median share is at least 50% (agrees), at least 25% (partly).",
                }
            )
    return out


def subnetwork_differences(results: dict) -> list[str]:
    """Plain statements of where Tables 3 and 4 come out differently from the paper's, from the measured numbers."""
    sub = results.get("subnetwork") or {}
    tsk = results["config"]["task"]
    out = []
    for alg, sec in (sub.get("reruns") or {}).items():
        srow = rows_of(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        i5, i4 = ident_at(r, 1e-5), ident_at(r, 1e-4)
        lo5 = min(v[1e-5] for v in paper.TABLE3.values()) / 100
        hi5 = max(v[1e-5] for v in paper.TABLE3.values()) / 100
        if i5 > hi5:
            out.append(
                f"- {alg.upper()}: θ_sub is *more* identical to θ_full at 1e-5 than in the paper ({pct(i5)} vs "
                f"{pct(lo5)}–{pct(hi5)}), on a {results['config']['steps']}-step run of a tiny model."
            )
        elif i5 < lo5:
            out.append(
                f"- {alg.upper()}: θ_sub is less identical to θ_full at 1e-5 than in the paper ({pct(i5)} vs "
                f"{pct(lo5)}–{pct(hi5)})."
            )
        if i4 < 1.0:
            n = next(x for x in r["identity"] if x["atol"] == 1e-4)
            out.append(
                f"- {alg.upper()}: not 100% at 1e-4 as in the paper: {n['numel'] - n['identical']:,} of "
                f"{n['numel']:,} entries ({pct(1 - i4, 2)}) differ by more than 1e-4."
            )
        f32 = ident_at(r, 1e-5, key="identity_fp32_masters")
        seeds = [ident_at(b, 1e-5, key="identity_fp32_masters") for b in rows_of(sec, "full run, another seed")]
        if seeds and f32 <= max(seeds):
            out.append(
                f"- {alg.upper()}: the reproduction holds in bf16 only. Between the fp32 masters, θ_sub matches "
                f"θ_full at 1e-5 in {pct(f32)} of entries and another seed's full run in {pct(max(seeds))}: the "
                "paper's test cannot see this, as it compares bf16 checkpoints."
            )
        gain = full_gain(results, sec, tsk)
        for b in rows_of(sec, "random-mask re-run"):
            d = acc_diff(sec, b, tsk)
            if d and abs(d[0]) <= d[1]:
                line = (
                    f"- {alg.upper()}: accuracy does not tell the subnetwork from a random mask here: `{b['run']}` "
                    f"reaches {pct(d[2]['accuracy'])} against θ_full's {pct(d[2]['accuracy'] - d[0])} (± "
                    f"{100 * d[1]:.1f} points), as later work found"
                )
                if gain is not None:
                    g_, z_, lr_ = gain
                    line += (
                        f"; RL at this learning rate (lr {lr_:g}) barely moves accuracy: θ_full gains {pts(g_)} "
                        f"over θ0 (± {100 * z_:.1f}, two standard errors)"
                        if abs(g_) <= z_
                        else f"; θ_full itself moves accuracy by {pts(g_)} from θ0 (± {100 * z_:.1f}, two standard "
                        "errors), more than the noise"
                    )
                out.append(line + ".")
    ov = sub.get("overlap")
    if ov:
        comps = ov["comparisons"]
        papered = [c for c in comps if c.get("paper") and c.get("reach") is not None]
        if papered:
            ours = [c["reach"] for c in papered]
            theirs = [c["paper"]["reach"] for c in papered]
            if min(ours) > max(theirs):
                out.append(
                    f"- The overlaps sit much further above the paper's chance than the paper's own (reach "
                    f"{min(ours):.2f}–{max(ours):.2f} against {min(theirs):.2f}–{max(theirs):.2f}), but the paper's "
                    "chance ignores weight magnitude: "
                    + "; ".join(
                        f"{c['what']}: o1 {pct(c['o1'])}, density chance {pct(c['chance_o1'])}, magnitude-"
                        f"matched chance {pct(c['magnitude_chance_o1'])}"
                        for c in papered[:1] + [c for c in papered if c["group"] != "seeds"]
                    )
                    + "."
                )
        data = [c for c in comps if c["group"] == "data" and c["o1_over_magnitude_chance"]]

        def at_rl(c):
            a, b = spec_of(results, c["a"]) or {}, spec_of(results, c["b"]) or {}
            return (
                a.get("learning_rate") == b.get("learning_rate") == results["config"]["rl_lr"]
                and a.get("task") is not None
                and a.get("task") == b.get("task")
            )

        same = [c for c in comps if c["group"] in ("seeds", "algorithm") and c["o1_over_magnitude_chance"] and at_rl(c)]
        if data and same:
            algos = {id(c): {algo_of(results, c["a"]), algo_of(results, c["b"])} for c in same}
            sft_rows = [c for c in same if "sft" in algos[id(c)]]
            sft_grpo = [c for c in same if algos[id(c)] == {"sft", "grpo"}]
            grpo_dpo = [c for c in same if algos[id(c)] == {"grpo", "dpo"}]
            ratios = [c["o1_over_magnitude_chance"] for c in same]
            d_ratio = max(c["o1_over_magnitude_chance"] for c in data)
            sft_txt = ", ".join(f"{c['a']}/{c['b']} {c['o1_over_magnitude_chance']:.2f}×" for c in sft_rows)
            margin = CRITERIA["same_algorithm_margin"]
            below = d_ratio < min(ratios)
            algo_gap = (
                max(
                    abs(x["o1_over_magnitude_chance"] - y["o1_over_magnitude_chance"])
                    for x in sft_grpo
                    for y in grpo_dpo
                )
                if sft_grpo and grpo_dpo
                else None
            )
            line = (
                f"- Beyond weight magnitude, subnetworks trained on one task at the RL learning rate share "
                f"{min(ratios):.2f}–{max(ratios):.2f}× the magnitude-matched chance, subnetworks of the two tasks "
                + ("only " if below else "")
                + ", ".join(f"{c['o1_over_magnitude_chance']:.2f}×" for c in data)
                + (f"; SFT at the RL learning rate and RL: {sft_txt}" if sft_rows else "")
            )
            if algo_gap is not None:
                gd_txt = ", ".join(f"{c['a']}/{c['b']} {c['o1_over_magnitude_chance']:.2f}×" for c in grpo_dpo)
                line += f"; GRPO vs DPO {gd_txt}, at most {algo_gap:.2f}× from every SFT-vs-GRPO ratio"
            if below and algo_gap is not None and algo_gap <= margin:
                line += (
                    ": what the masks share beyond |w| follows the task data, not the RL algorithm (the two-task "
                    f"ratio is below every same-task one, and swapping RL for SFT moves the ratio by {algo_gap:.2f}×, "
                    f"within the {margin:.2f}× margin)."
                )
            else:
                why_not = []
                if not below:
                    why_not.append("the two-task ratio is not below every same-task one")
                if algo_gap is None:
                    why_not.append("no SFT-vs-GRPO and GRPO-vs-DPO pair at the RL learning rate to compare")
                elif algo_gap > margin:
                    why_not.append(f"SFT-vs-GRPO and GRPO-vs-DPO differ by more than {margin:.2f}×")
                line += (
                    ". Whether the shared part follows the task data rather than the algorithm is not settled here: "
                    + "; ".join(why_not)
                    + "."
                )
            out.append(line)
    return out


def why_fp32(results: dict, sec: dict) -> str:
    """Why θ_sub can match θ_full in bf16 and not in fp32, said only as far as this run's numbers show it."""
    full = results["stages"].get(sec["full"])
    if full is None:
        return "."
    kept32 = sp(full, 0.0, "fp32")  # masters of the full run bitwise equal to θ0
    if dense_in_fp32(full):
        return (
            f": the full run moved all but {pct(kept32, 3)} of its masters away from θ0, yet its bf16 checkpoint "
            f"still equals θ0 in {pct(sp(full, 0.0))} of the entries (those masters moved by less than half a bf16 "
            "step), while the re-run left every master outside M at θ0; so the Table 3 identity is a property of the "
            "bf16 checkpoints the paper compares, not of the trained weights."
        )
    return (
        f"; the full run left {pct(kept32)} of its masters bitwise at θ0 (bf16: {pct(sp(full, 0.0))}), so the "
        "difference is not only rounding."
    )
