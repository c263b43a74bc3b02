"""The paper's claims about the finetuning stages, checked against this run's measurements: for each, what the
paper says, what we measured, a verdict under :data:`~rlsubnet.lab.report.criteria.CRITERIA`, and why."""

from __future__ import annotations

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.criteria import CRITERIA, dense_in_fp32, one_curve_gap
from rlsubnet.lab.report.records import acc, at_atol, comparable, pct, pts, rl_stages, sp, trained, two_se
from rlsubnet.lab.report.subnetwork_claims import assess_subnetworks


def assess(results: dict) -> list[dict]:
    """One record per claim: what the paper says, what we measured, a verdict under ``CRITERIA``, and why."""
    st = results["stages"]
    cfg = results["config"]
    out = []
    rl = rl_stages(results)
    small = CRITERIA["small_effect_points"] / 100
    near = CRITERIA["gap_closed_points"] / 100
    idle = [n for n, s in st.items() if not trained(s)]
    if idle:
        out.append(
            {
                "id": "did-not-train",
                "claim": "Every stage trained.",
                "paper": "–",
                "ours": f"no fp32 master weight moved in: {', '.join(idle)}",
                "verdict": "warning",
                "why": "a GRPO run whose groups all had equal rewards (all right or all wrong) has zero advantages and no "
                "gradient; these stages are left out of the comparisons below. A weak θ0 is the usual cause.",
            }
        )
    th0 = results["theta0"]
    if not th0.get("target_reached", True):
        tgt = th0["spec"]["target_accuracy"]
        curve = th0.get("curve") or []
        last = curve[-1]["validation_accuracy"] if curve else {}
        out.append(
            {
                "id": "pretrain-target",
                "claim": "θ0 reached its pretraining accuracy target.",
                "paper": "–",
                "ours": f"stopped after {th0['steps_done']} of at most {th0['spec']['max_steps']} steps without reaching the target "
                f"(validation accuracy ≥ {pct(tgt)} on every task)"
                + (f"; last validation accuracy {', '.join(f'{t} {pct(v)}' for t, v in last.items())}" if last else ""),
                "verdict": "warning",
                "why": "every stage below starts from a weaker base than the configuration asked for; how sparse an update is "
                "depends on the base (its weight magnitudes and how often its samples are correct), so these numbers "
                "describe this θ0, not the one the settings intended.",
            }
        )

    # 1. RL sparse (RL at the RL learning rate: the paper's setting)
    lo, hi = paper.RL_RANGE
    vals = {n: sp(st[n]) for n in rl}
    if vals:
        inside = [n for n, v in vals.items() if lo <= 100 * v <= hi]
        below = [n for n, v in vals.items() if 100 * v < lo]
        above = [n for n, v in vals.items() if 100 * v > hi]
        verdict = "agrees" if len(inside) == len(vals) else "partly agrees" if inside else "differs"
        where = "; ".join(
            x
            for x in (
                f"below the paper's range: {', '.join(below)}" if below else "",
                f"above it: {', '.join(above)}" if above else "",
            )
            if x
        )
        out.append(
            {
                "id": "rl-sparse",
                "claim": "RL updates are sparse: 68.5–96.0% of parameters unchanged (Table 1, bf16, atol 1e-5).",
                "paper": f"{lo}–{hi}%",
                "ours": ", ".join(f"{n} {pct(v)}" for n, v in vals.items())
                + f" (RL lr {cfg['rl_lr']:g}, {cfg['steps']} steps)",
                "verdict": verdict,
                "why": f"{len(inside)} of {len(vals)} RL stages at the RL learning rate fall inside the paper's range"
                + (f" ({where})" if where else "")
                + ".",
            }
        )

    # 2. SFT dense
    if "sft" in st:
        v = sp(st["sft"])
        lo, hi = paper.SFT_RANGE
        rl_min = min(vals.values()) if vals else None
        if lo <= 100 * v <= hi:
            verdict, why = "agrees", "inside the paper's range"
        else:
            side = (
                f"{pts(v - hi / 100).lstrip('+')} above its top"
                if 100 * v > hi
                else f"{pts(lo / 100 - v).lstrip('+')} below its bottom: denser than the paper's SFT runs"
            )
            if rl_min is not None and v < rl_min - near:
                verdict = "partly agrees"
                why = (
                    f"outside the paper's range ({side}), but far denser than every RL stage at the RL learning rate "
                    f"(the sparsest of those keeps {pct(rl_min)}; far = more than {CRITERIA['gap_closed_points']:g} "
                    "points)"
                )
            else:
                verdict = "differs"
                why = (
                    f"outside the paper's range ({side}) and not clearly denser than RL (clearly = more than "
                    f"{CRITERIA['gap_closed_points']:g} points below the sparsest RL stage at the RL learning rate"
                    + (f", which keeps {pct(rl_min)}" if rl_min is not None else "")
                    + ")"
                )
        out.append(
            {
                "id": "sft-dense",
                "claim": "SFT changes almost every parameter (6–15% sparsity).",
                "paper": f"{lo}–{hi}%",
                "ours": f"sft (lr {st['sft']['spec']['learning_rate']:g}) {pct(v)}",
                "verdict": verdict,
                "why": why,
            }
        )

    # 3. learning-rate confound (later work), from both sides
    pairs = []
    for sft_name in ("sft-matched", "sft"):
        if sft_name in st and trained(st[sft_name]):
            pairs += [
                (a, sft_name) for a in rl_stages(results, "any") if comparable(st[a]["spec"], st[sft_name]["spec"])
            ]
    if pairs:
        gaps = {(a, b): sp(st[a]) - sp(st[b]) for a, b in pairs}
        closed = [k for k, g in gaps.items() if abs(g) <= near]
        out.append(
            {
                "id": "lr-confound",
                "claim": "Later work: at equal learning rate and steps, SFT and RL can be similarly sparse, i.e. the SFT/RL "
                "gap is largely a learning-rate effect (the paper's SFT runs use ~10× the RL learning rate).",
                "paper": "not measured in the paper",
                "ours": "; ".join(
                    f"{a} {pct(sp(st[a]))} vs {b} {pct(sp(st[b]))} (both lr {st[a]['spec']['learning_rate']:g})"
                    for a, b in pairs
                ),
                "verdict": "supports the confound"
                if len(closed) == len(gaps)
                else "partly"
                if closed
                else "gap remains",
                "why": f"RL minus SFT at the same learning rate: {', '.join(f'{a} − {b} {pts(g)}' for (a, b), g in gaps.items())} "
                f"(similar = within {CRITERIA['gap_closed_points']:g} points; each pair shares task, learning rate, "
                "steps, batch size and data seed, so only the algorithm and its training rows differ).",
            }
        )

    # 4. rank
    ranks = {n: st[n]["bf16_rank"]["mean_rank_ratio"] for n in rl if st[n]["bf16_rank"]["mean_rank_ratio"] is not None}
    if ranks:
        ok = [n for n, r in ranks.items() if r >= CRITERIA["full_rank"]]
        out.append(
            {
                "id": "full-rank",
                "claim": "Sparse but full rank: mean rank of ΔW 99.2–99.8% of min(m, n).",
                "paper": f"{paper.RANK_RANGE[0]}–{paper.RANK_RANGE[1]}%",
                "ours": ", ".join(f"{n} {pct(r)}" for n, r in ranks.items()),
                "verdict": "agrees" if len(ok) == len(ranks) else "partly agrees" if ok else "differs",
                "why": f"nearly full rank = at least {CRITERIA['full_rank']:.0%}; torch.linalg.matrix_rank with its default "
                "threshold on the bf16 Δ, 2-D non-norm matrices.",
            }
        )

    # 5. layers, matrices, norms
    if "grpo" in rl:
        g = st["grpo"]
        lay = [at_atol(x, "sparsity") for x in g["bf16"]["layers"] if x["layer"] is not None]
        mats = {x["name"]: x["sparsity"] for x in g.get("matrices", [])}
        norm = next((x for x in g["bf16"]["modules"] if x["module"] == "norm"), None)
        norm_sp = at_atol(norm, "sparsity") if norm else None
        u = CRITERIA["uniform_layers_points"] / 100
        layers_ok = (max(lay) - min(lay)) <= u if lay else True
        mats_ok = (max(mats.values()) - min(mats.values())) <= u if mats else True
        norms_ok = norm_sp is not None and norm_sp >= 0.99
        lo_m = min(mats, key=lambda n: mats[n]) if mats else None
        hi_m = max(mats, key=lambda n: mats[n]) if mats else None
        drift = g["spec"]["learning_rate"] * g["spec"]["steps"]
        half_ulp = 2.0**-8  # half a bf16 step at |w| = 1.0 (8 significant bits: a step of 2^-7 in [1, 2))
        if drift < half_ulp:
            norm_txt = (
                f"A norm weight near 1.0 changes in bf16 only once its master has drifted by half a bf16 step, "
                f"2^-8 ≈ {half_ulp:.4f}; this run's lr × steps = {drift:.3g} is below that, so Adam's ~lr per step "
                "cannot get there unless |m̂|/√v̂ stays above 1"
                + (
                    ""
                    if norms_ok
                    else f", yet {pct(1 - norm_sp)} of the norm weights changed"
                    if norm_sp is not None
                    else ""
                )
                + "."
            )
        else:
            norm_txt = (
                f"This run's lr × steps = {drift:.3g} reaches half a bf16 step at 1.0 (2^-8 ≈ {half_ulp:.4f}), "
                "so precision alone does not keep norm weights near 1.0 fixed; "
                + (
                    f"{pct(norm_sp)} of them are unchanged."
                    if norm_sp is not None
                    else "no norm weights were found to measure."
                )
            )
        out.append(
            {
                "id": "uniform-layers",
                "claim": "All layers and matrices are updated about equally sparsely; layer norms are almost never updated.",
                "paper": "qualitative (Fig. 2)",
                "ours": f"grpo per block {pct(min(lay))}–{pct(max(lay))}; per matrix {pct(mats[lo_m])} ({lo_m}) to "
                f"{pct(mats[hi_m])} ({hi_m}); norm weights {pct(norm_sp)} unchanged",
                "verdict": "agrees"
                if layers_ok and mats_ok and norms_ok
                else "partly agrees"
                if layers_ok or mats_ok or norms_ok
                else "differs",
                "why": f"about equal = max − min at most {CRITERIA['uniform_layers_points']:g} points; norms frozen = at least "
                f"99% unchanged. Blocks {'are' if layers_ok else 'are not'} about equally sparse, matrices "
                f"{'are' if mats_ok else 'are not'}. " + norm_txt,
            }
        )

    # 6, 7. KL and clipping
    seed_sp = [
        s_["sparsity"]["bf16"]["1e-05"]
        for s_ in ((results.get("subnetwork") or {}).get("runs") or {}).values()
        if s_["role"] == "full run, another seed" and s_["of"] == "grpo"
    ]
    spread = (
        f"GRPO's sparsity over {len(seed_sp) + 1} seeds spans {100 * (max(seed_sp + [sp(st['grpo'])]) - min(seed_sp + [sp(st['grpo'])])):.1f} "
        "points"
        if seed_sp and "grpo" in st
        else "one seed: run-to-run spread is not measured here"
    )
    for name, knob, cid in (("grpo-kl", "the KL term", "kl"), ("grpo-noclip", "gradient clipping", "clip")):
        if name in rl and "grpo" in rl:
            d = sp(st[name]) - sp(st["grpo"])
            out.append(
                {
                    "id": f"{cid}-little-effect",
                    "claim": f"{knob[0].upper() + knob[1:]} has little effect on sparsity.",
                    "paper": "qualitative (§5)",
                    "ours": f"{name} {pct(sp(st[name]))} vs grpo {pct(sp(st['grpo']))} ({pts(d)})",
                    "verdict": "agrees" if abs(d) <= small else "differs",
                    "why": f"little effect = within {CRITERIA['small_effect_points']:g} points at atol 1e-5 ({spread}).",
                }
            )

    # 8. in-distribution data / RFT
    if "rft" in st and "sft" in st:
        v_rft, v_sft = sp(st["rft"]), sp(st["sft"])
        lr = st["rft"]["spec"]["learning_rate"]
        extra = ""
        if "rft-matched" in st and "sft-matched" in st:
            extra = (
                f"; at lr {st['rft-matched']['spec']['learning_rate']:g}: rft-matched {pct(sp(st['rft-matched']))} "
                f"vs sft-matched {pct(sp(st['sft-matched']))}"
            )
        sparser = v_rft - v_sft > near
        rft_min = CRITERIA["rft_sparse_at_least"]
        as_rl = v_rft >= rft_min
        d_rft, d_sft = st["rft"].get("data") or {}, st["sft"].get("data") or {}
        pools = (
            f" (a pool of {d_rft['pool']:,} training prompts against sft's {d_sft['pool']:,})"
            if "pool" in d_rft and "pool" in d_sft
            else ""
        )
        out.append(
            {
                "id": "in-distribution",
                "claim": "Training on data near the policy's own distribution causes the sparsity: SFT on the policy's own "
                "correct samples (rejection-sampling FT) is also sparse (91.2%).",
                "paper": f"RFT {paper.RFT_SPARSITY}%",
                "ours": f"rft {pct(v_rft)} vs sft {pct(v_sft)} at lr {lr:g}{extra}",
                "verdict": ("agrees" if sparser and as_rl else "partly agrees" if sparser else "differs"),
                "why": f"at the same learning rate, training on θ0's own samples changes sparsity by {pts(v_rft - v_sft)} "
                f"(a real effect = more than {CRITERIA['gap_closed_points']:g} points); 'also sparse' = rft keeps at "
                f"least {pct(rft_min)} unchanged (the low end of the paper's RL range), which it "
                f"{'does' if as_rl else 'does not'}; the paper's 91.2% is "
                f"{'reached' if 100 * v_rft >= paper.RFT_SPARSITY else 'not reached'} at lr {lr:g}. A confound of this "
                "lab task: the reward is an exact match of the normalised completion with the reference answer, so a "
                "correct sample of θ0 is the reference answer and every rft row is the sft row for its prompt; rft "
                f"differs from sft only in which prompts it keeps, those θ0 already solves{pools}, not in the text "
                "it trains on.",
            }
        )

    # 9, 10. dynamics
    if "grpo" in rl and st["grpo"]["sparsity_vs_step"]:
        pts_ = st["grpo"]["sparsity_vs_step"]
        curve = [p["sparsity"]["1e-05"] for p in pts_]
        steps = [p["step"] for p in pts_]
        drops = [a - b for a, b in zip(curve, curve[1:])]
        tol = CRITERIA["monotone_tolerance_points"] / 100
        monotone = all(d >= -tol for d in drops)
        half = max(1, len(drops) // 2)
        first, second = sum(drops[:half]), sum(drops[half:])
        levels = second < 0.5 * first if first > 0 else False
        out.append(
            {
                "id": "decay",
                "claim": "Sparsity decays with training and levels off (~80% for PRIME).",
                "paper": f"levels off near {paper.PRIME_PLATEAU:g}%",
                "ours": f"grpo: {pct(curve[1] if len(curve) > 1 else curve[0])} after {steps[1] if len(steps) > 1 else 0} steps, "
                f"{pct(curve[-1])} after {steps[-1]}; sparsity lost in the first half of the run {pts(first).lstrip('+')}, "
                f"in the second half {pts(second).lstrip('+')}",
                "verdict": "agrees" if monotone and levels else "partly agrees" if monotone else "differs",
                "why": ("it decays monotonically" if monotone else "it does not decay monotonically")
                + f" (monotonically = no snapshot sparser than the one before by more than "
                f"{CRITERIA['monotone_tolerance_points']:g} points; the largest rise is "
                f"{pts(max([0.0] + [-d for d in drops])).lstrip('+')})"
                + "; "
                + (
                    "it levels off (the second half loses less than half of what the first lost)"
                    if levels
                    else f"it has not levelled off within {steps[-1]} steps"
                ),
            }
        )
        dec_snap = next((d for d in st["grpo"]["decomposition_snapshots"] if d["atol"] == 1e-5), None)
        dec_step = next((d for d in st["grpo"]["decomposition_every_step"] if d["atol"] == 1e-5), None)
        if dec_snap:
            p = paper.DYNAMICS_PRIME
            fine = dec_step or dec_snap

            def trio(d):
                return f"{pct(d['never_share'])} / {pct(d['returned_share'])} / {pct(d['final_share'])}"

            tol = CRITERIA["decomposition_share_points"]
            f = CRITERIA["ever_outside_factor"]

            # Within tol points and within a factor f: an absolute bar alone lets 0.5% pass for 8%.
            def close_to(ours, theirs):
                return abs(ours - theirs) <= tol and theirs / f <= ours <= theirs * f

            share_ok = {k: close_to(100 * fine[f"{k}_share"], p[k]) for k in ("never", "returned", "final")}
            ever = 100 * fine["returned_share_of_ever"]
            e_lo, e_hi = paper.EVER_UPDATED_OUTSIDE_FINAL / f, paper.EVER_UPDATED_OUTSIDE_FINAL * f
            ever_ok = e_lo <= ever <= e_hi
            checks = [*share_ok.values(), ever_ok]
            verdict = "agrees" if all(checks) else "partly agrees" if any(checks) else "differs"
            res = "by share: " + ", ".join(
                f"{k} {pct(fine[f'{k}_share'])} vs {p[k]:g}% ({'within' if ok else 'not within'} {tol:g} points and a "
                f"factor {f:g})"
                for k, ok in share_ok.items()
            )
            res += (
                f"; ending outside the final subnetwork: {ever:.1f}% of the ever-updated parameters against the "
                f"paper's {paper.EVER_UPDATED_OUTSIDE_FINAL:g}% ({'within' if ever_ok else 'outside'} "
                f"{e_lo:.3g}–{e_hi:.3g}%)"
            )
            if ever < e_lo:
                mech = (
                    f" Few parameters return here: returning needs a master weight to cross a bf16 rounding boundary "
                    f"and cross back, which {cfg['steps']} steps of a slowly drifting Adam run rarely do; the paper's "
                    "runs are far longer."
                )
            elif ever > e_hi:
                mech = " More of the ever-updated parameters return here than in the paper."
            else:
                mech = ""
            res_note = (
                " A change made and undone between two snapshots is invisible to the snapshots, hence the check "
                "after every step as well (the shares checked above are from it)."
                if dec_step
                else " Only snapshots were checked: a change made and undone between two of them is invisible, so the "
                "returned share is a lower bound."
            )
            out.append(
                {
                    "id": "decomposition",
                    "claim": "Of all parameters ~72% never change, ~8% change and cancel, ~20% form the final subnetwork "
                    "(PRIME); about 8.5% of parameters ever updated end outside the final subnetwork.",
                    "paper": f"{p['never']:g} / {p['returned']:g} / {p['final']:g}%; 8.5%",
                    "ours": f"grpo never / returned / final {trio(dec_snap)} (snapshots every {st['grpo']['snapshot_every']} steps)"
                    + (f", {trio(dec_step)} (checked after every step)" if dec_step else "")
                    + f"; returned = {pct(fine['returned_share_of_ever'])} of the ever-updated parameters",
                    "verdict": verdict,
                    "why": f"the paper's two figures are not consistent with each other: ~8% returned out of ~8 + 20 = 28% "
                    f"ever updated is {100 * p['returned'] / (p['returned'] + p['final']):.1f}% of the ever-updated "
                    f"parameters, not {paper.EVER_UPDATED_OUTSIDE_FINAL:g}%, so we check them separately: each share "
                    f"within {tol:g} points and a factor {f:g} of {p['never']:g} / {p['returned']:g} / {p['final']:g}%, and the share of "
                    f"the ever-updated parameters that end outside the final subnetwork within a factor {f:g} of "
                    f"{paper.EVER_UPDATED_OUTSIDE_FINAL:g}%; agrees = all four hold, partly = some. Ours {res}."
                    + mech
                    + res_note,
                }
            )

    # 11. precision (later work)
    if "grpo" in rl:
        g = st["grpo"]
        mag = g["magnitude_bf16"]["buckets"]
        lr, T = g["spec"]["learning_rate"], g["spec"]["steps"]
        bound = 512 * lr * T
        above_bound = [b for b in mag if b["lo"] >= bound]
        n_above = sum(b["numel"] for b in above_bound)
        ch_above = sum(b["numel"] * b["p_changed"]["0.0"] for b in above_bound)
        fp32_dense = dense_in_fp32(g)
        bound_ok = n_above == 0 or ch_above / n_above <= CRITERIA["changed_above_bound_at_most"]
        curve = one_curve_gap(results)
        checks = [fp32_dense, bound_ok]
        if curve is None:
            curve_txt = (
                f"No two trained stages on {cfg['task']} share a learning rate and step count (with a |w| bucket of "
                f"at least {CRITERIA['one_curve_min_bucket']:,} weights), so one curve per learning rate is not "
                "tested."
            )
        else:
            gap, (lr_g, b_g, names_g) = curve
            on_one = gap <= CRITERIA["one_curve_points"] / 100
            checks.append(on_one)
            curve_txt = (
                f"In the P(changed | |w|) figure's data (atol 0), stages on {cfg['task']} that share a learning rate "
                f"and step count {'fall' if on_one else 'do not fall'} on one curve whatever the algorithm: the "
                f"largest gap between two of them in one |w| bucket is {100 * gap:.1f} points (lr {lr_g:g}, |w| in "
                f"[{b_g['lo']:.3g}, {b_g['hi']:.3g}), among {', '.join(names_g)}; one curve = at most "
                f"{CRITERIA['one_curve_points']:g} points, over buckets of at least "
                f"{CRITERIA['one_curve_min_bucket']:,} weights)."
            )
        out.append(
            {
                "id": "precision",
                "claim": "Later work: bf16 precision gates what counts as 'changed': compared in fp32 the same run is dense, "
                "and a weight can only change in bf16 when its master drifts past half a bf16 step (≈ |w|/512).",
                "paper": "not in the paper",
                "ours": f"grpo unchanged at atol 0: bf16 {pct(sp(g, 0.0))}, fp32 masters {pct(sp(g, 0.0, 'fp32'))}; "
                f"{int(round(ch_above)):,} of {n_above:,} weights with |w| ≥ 512·lr·T = {bound:.3g} changed in bf16",
                "verdict": "agrees" if all(checks) else "partly agrees" if any(checks) else "differs",
                "why": "Adam moves a weight by about lr per step, so after T steps a master has drifted at most ~lr·T "
                "(more only when |m̂|/√v̂ > 1); a bf16 value with |w| above 512·lr·T cannot change. "
                f"Dense in fp32 = at most {pct(CRITERIA['fp32_dense_at_most'], 0)} of the masters bitwise unchanged "
                f"({'holds' if fp32_dense else 'does not hold'}); the bound holds when at most "
                f"{pct(CRITERIA['changed_above_bound_at_most'], 0)} of the weights above it changed "
                f"({'it does' if bound_ok else 'it does not'}"
                + (", vacuously: no weight lies above it" if n_above == 0 else "")
                + "). "
                + curve_txt,
            }
        )

    # accuracy
    tsk = cfg["task"]
    th = results["theta0"]["accuracy"][tsk]["bf16"]
    rows = []
    for n in rl_stages(results, "any"):
        if tsk not in st[n]["accuracy"] or st[n]["spec"]["task"] != tsk:
            continue
        a = acc(st[n], tsk)
        diff = a["accuracy"] - th["accuracy"]
        noise = two_se(th, a)
        rows.append((n, st[n]["spec"]["learning_rate"], diff, noise))
    if rows:
        improved = [n for n, _, d, z in rows if d > z]
        out.append(
            {
                "id": "accuracy",
                "claim": "RL finetuning improves the task (the premise of the paper's setting).",
                "paper": "gains on their benchmarks",
                "ours": ", ".join(f"{n} (lr {lr:g}) {pts(d)} ± {100 * z:.1f}" for n, lr, d, z in rows)
                + f" on {th['n']:,} held-out {tsk} problems (bf16 checkpoints)",
                "verdict": "agrees" if len(improved) == len(rows) else "partly agrees" if improved else "differs",
                "why": "an improvement counts when it exceeds two standard errors of the difference (independent binomials; "
                f"conservative, as the same problems are used). Significant: {', '.join(improved) or 'none'}.",
            }
        )

    out += assess_subnetworks(results)
    return out
