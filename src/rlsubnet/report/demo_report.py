"""The demo's report: ``report.md``, PNG figures under ``figures/`` and the figure records for results.json.

Reads the results dict built by ``rlsubnet.lab.pipeline`` (records, never checkpoints). Every number printed
is one that was measured in this run; the paper's numbers come from ``paper_numbers`` and are always labelled
as the paper's. Verdicts follow fixed, stated criteria (``CRITERIA``), so a reader can disagree with the
threshold but never has to guess it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rlsubnet._version import __version__
from rlsubnet.fileio import atomic_write_bytes, atomic_write_text
from rlsubnet.report import paper_numbers as paper
from rlsubnet.report import plots

CRITERIA = {
    "small_effect_points": 2.0,  # a knob "has little effect" when sparsity moves by at most this many points
    "gap_closed_points": 10.0,  # SFT and RL "similarly sparse" when within this many points
    "full_rank": 0.99,  # "nearly full rank": mean rank / min(m, n) at least this
    "uniform_layers_points": 10.0,  # layers "about equally sparse": max − min over blocks at most this
    # Table 3: θ_sub reproduces θ_full when identity at 1e-5 reaches the paper's lower figure (PRIME 90.5%) and
    # identity at 1e-4 is "100%" to this many points, and accuracy is not lower by more than two standard errors
    "identity_1e-5": 0.905,
    "identity_1e-4_points": 0.5,
    # θ_sub beats a baseline when its identity at 1e-5 is higher by more than this many points
    "beats_baseline_points": 2.0,
    # Table 4: "far above chance" = o1 and o2 each cover at least this share of the way from the density chance to
    # the most the two densities allow (min(1, d_B/d_A) for o1); the paper's own Table 4 rows reach 0.38–0.48
    "above_chance_reach": 0.25,
    # SFT on θ0's own correct samples (RFT) is "also sparse" like RL when it keeps at least the low end of the paper's
    # RL range (Table 1) unchanged, besides being sparser than SFT on reference answers by more than gap_closed_points
    "rft_sparse_at_least": paper.RL_RANGE[0] / 100,
    # sparsity "decays monotonically" when no snapshot is sparser than the one before by more than this many points
    "monotone_tolerance_points": 0.2,
    # the never / returned / final decomposition matches the paper's PRIME shares (72 / 8 / 20%) when each share is
    # within this many points AND within this factor of the paper's (so 0.5% does not pass for 8%), and the share
    # of ever-updated parameters that end outside the final subnetwork matches the paper's 8.5% when it lies within
    # the factor of it (8.5 / 2 to 8.5 × 2)
    "decomposition_share_points": 10.0,
    "ever_outside_factor": 2.0,
    # precision: "dense in fp32" = at most this share of fp32 masters bitwise unchanged; "cannot change above the
    # drift bound" = at most this share of the weights with |w| ≥ 512·lr·T changed in bf16
    "fp32_dense_at_most": 0.05,
    "changed_above_bound_at_most": 0.01,
    # the summary says bf16 rounding, not the optimizer, makes the sparsity only when every trained stage is dense in
    # fp32 (above) and its fp32 sparsity is at most this fraction of its bf16 sparsity (both bitwise)
    "fp32_at_most_of_bf16": 0.5,
    # stages that share a learning rate (and step count) "fall on one curve" of P(changed | |w|) at atol 0 when, in
    # every |w| bucket of at least one_curve_min_bucket weights, their P(changed) differ by at most this many points
    "one_curve_points": 5.0,
    "one_curve_min_bucket": 1000,
    # overlap beyond |w| "follows the task data, not the RL algorithm" when the two-task ratio o1 / magnitude-matched
    # chance is below every same-task ratio and SFT-vs-GRPO at the same lr is within this margin of GRPO-vs-DPO
    "same_algorithm_margin": 0.10,
}
RL_ALGOS = ("grpo", "dpo")


# -- accessors over the results dict


def sp(stage: dict, atol: float = 1e-5, dtype: str = "bf16") -> float:
    """Sparsity (fraction) of a stage against θ0."""
    return stage["sparsity"][dtype][repr(float(atol))]


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.{digits}f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def acc(stage_or_theta0: dict, task: str, which: str = "bf16") -> dict:
    return stage_or_theta0["accuracy"][task][which]


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else float("nan")


def two_se(a: dict, b: dict) -> float:
    """Two standard errors of the difference of two accuracy records ({"accuracy", "n"}), independent binomials."""
    return 2 * math.sqrt(se(a["accuracy"], a["n"]) ** 2 + se(b["accuracy"], b["n"]) ** 2)


def dense_in_fp32(stage: dict) -> bool:
    """At most CRITERIA["fp32_dense_at_most"] of the stage's fp32 masters are bitwise equal to θ0."""
    return sp(stage, 0.0, "fp32") <= CRITERIA["fp32_dense_at_most"]


def trained(stage: dict) -> bool:
    """Whether any fp32 master weight moved at all (a GRPO run whose groups all had equal rewards does not)."""
    return sp(stage, 0.0, "fp32") < 1.0


def rl_stages(results: dict, lr: str = "rl") -> list[str]:
    """RL stages that trained, at the RL learning rate (``lr="rl"``), at any other (``"other"``) or all (``"any"``)."""
    rl_lr = results["config"]["rl_lr"]
    out = []
    for n, s in results["stages"].items():
        if s["spec"]["algorithm"] not in RL_ALGOS or not trained(s):
            continue
        at_rl = s["spec"]["learning_rate"] == rl_lr
        if lr == "any" or (lr == "rl") == at_rl:
            out.append(n)
    return out


COMPARABLE_KEYS = ("task", "learning_rate", "steps", "batch_size", "data_seed")


def _comparable(a: dict, b: dict) -> bool:
    """Two stage specs that differ only in algorithm and training rows: same task, lr, steps, batch and data seed."""
    return all(a.get(k) == b.get(k) for k in COMPARABLE_KEYS)


def _at(stage: dict, key: str, atol: float = 1e-5) -> float:
    return next(r[key] for r in stage["by_atol"] if r["atol"] == atol)


def settings_of(results: dict, names: Sequence[str] | None = None, extra: str = "") -> str:
    """One line: the settings a figure was produced with."""
    c = results["config"]
    st = results["stages"]
    lrs = sorted({st[n]["spec"]["learning_rate"] for n in (names or st)})
    return (f"size {c['size']} ({results['theta0']['parameters']:,} params), {c['steps']} steps, batch {c['batch_size']}, "
            f"lr {', '.join(f'{x:g}' for x in lrs)}, seed {c['seed']}, fp32 masters" + (f"; {extra}" if extra else ""))


# -- the paper's claims, checked


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
        out.append({
            "id": "did-not-train", "claim": "Every stage trained.", "paper": "–",
            "ours": f"no fp32 master weight moved in: {', '.join(idle)}", "verdict": "warning",
            "why": "a GRPO run whose groups all had equal rewards (all right or all wrong) has zero advantages and no "
                   "gradient; these stages are left out of the comparisons below. A weak θ0 is the usual cause.",
        })
    th0 = results["theta0"]
    if not th0.get("target_reached", True):
        tgt = th0["spec"]["target_accuracy"]
        curve = th0.get("curve") or []
        last = curve[-1]["validation_accuracy"] if curve else {}
        out.append({
            "id": "pretrain-target", "claim": "θ0 reached its pretraining accuracy target.",
            "paper": "–",
            "ours": f"stopped after {th0['steps_done']} of at most {th0['spec']['max_steps']} steps without reaching the target "
                    f"(validation accuracy ≥ {pct(tgt)} on every task)"
                    + (f"; last validation accuracy {', '.join(f'{t} {pct(v)}' for t, v in last.items())}" if last else ""),
            "verdict": "warning",
            "why": "every stage below starts from a weaker base than the configuration asked for; how sparse an update is "
                   "depends on the base (its weight magnitudes and how often its samples are correct), so these numbers "
                   "describe this θ0, not the one the settings intended.",
        })

    # 1. RL sparse (RL at the RL learning rate: the paper's setting)
    lo, hi = paper.RL_RANGE
    vals = {n: sp(st[n]) for n in rl}
    if vals:
        inside = [n for n, v in vals.items() if lo <= 100 * v <= hi]
        below = [n for n, v in vals.items() if 100 * v < lo]
        above = [n for n, v in vals.items() if 100 * v > hi]
        verdict = "agrees" if len(inside) == len(vals) else "partly agrees" if inside else "differs"
        where = "; ".join(x for x in (f"below the paper's range: {', '.join(below)}" if below else "",
                                      f"above it: {', '.join(above)}" if above else "") if x)
        out.append({
            "id": "rl-sparse",
            "claim": "RL updates are sparse: 68.5–96.0% of parameters unchanged (Table 1, bf16, atol 1e-5).",
            "paper": f"{lo}–{hi}%",
            "ours": ", ".join(f"{n} {pct(v)}" for n, v in vals.items()) + f" (RL lr {cfg['rl_lr']:g}, {cfg['steps']} steps)",
            "verdict": verdict,
            "why": f"{len(inside)} of {len(vals)} RL stages at the RL learning rate fall inside the paper's range"
                   + (f" ({where})" if where else "") + ".",
        })

    # 2. SFT dense
    if "sft" in st:
        v = sp(st["sft"])
        lo, hi = paper.SFT_RANGE
        rl_min = min(vals.values()) if vals else None
        if lo <= 100 * v <= hi:
            verdict, why = "agrees", "inside the paper's range"
        else:
            side = (f"{pts(v - hi / 100).lstrip('+')} above its top" if 100 * v > hi else
                    f"{pts(lo / 100 - v).lstrip('+')} below its bottom: denser than the paper's SFT runs")
            if rl_min is not None and v < rl_min - near:
                verdict = "partly agrees"
                why = (f"outside the paper's range ({side}), but far denser than every RL stage at the RL learning rate "
                       f"(the sparsest of those keeps {pct(rl_min)}; far = more than {CRITERIA['gap_closed_points']:g} "
                       "points)")
            else:
                verdict = "differs"
                why = (f"outside the paper's range ({side}) and not clearly denser than RL (clearly = more than "
                       f"{CRITERIA['gap_closed_points']:g} points below the sparsest RL stage at the RL learning rate"
                       + (f", which keeps {pct(rl_min)}" if rl_min is not None else "") + ")")
        out.append({"id": "sft-dense", "claim": "SFT changes almost every parameter (6–15% sparsity).",
                    "paper": f"{lo}–{hi}%", "ours": f"sft (lr {st['sft']['spec']['learning_rate']:g}) {pct(v)}",
                    "verdict": verdict, "why": why})

    # 3. learning-rate confound (later work), from both sides
    pairs = []
    for b in ("sft-matched", "sft"):
        if b in st and trained(st[b]):
            pairs += [(a, b) for a in rl_stages(results, "any") if _comparable(st[a]["spec"], st[b]["spec"])]
    if pairs:
        gaps = {(a, b): sp(st[a]) - sp(st[b]) for a, b in pairs}
        closed = [k for k, g in gaps.items() if abs(g) <= near]
        out.append({
            "id": "lr-confound",
            "claim": "Later work: at equal learning rate and steps, SFT and RL can be similarly sparse, i.e. the SFT/RL "
                     "gap is largely a learning-rate effect (the paper's SFT runs use ~10× the RL learning rate).",
            "paper": "not measured in the paper",
            "ours": "; ".join(f"{a} {pct(sp(st[a]))} vs {b} {pct(sp(st[b]))} (both lr {st[a]['spec']['learning_rate']:g})"
                              for a, b in pairs),
            "verdict": "supports the confound" if len(closed) == len(gaps) else "partly" if closed else "gap remains",
            "why": f"RL minus SFT at the same learning rate: {', '.join(f'{a} − {b} {pts(g)}' for (a, b), g in gaps.items())} "
                   f"(similar = within {CRITERIA['gap_closed_points']:g} points; each pair shares task, learning rate, "
                   "steps, batch size and data seed, so only the algorithm and its training rows differ).",
        })

    # 4. rank
    ranks = {n: st[n]["bf16_rank"]["mean_rank_ratio"] for n in rl if st[n]["bf16_rank"]["mean_rank_ratio"] is not None}
    if ranks:
        ok = [n for n, r in ranks.items() if r >= CRITERIA["full_rank"]]
        out.append({
            "id": "full-rank", "claim": "Sparse but full rank: mean rank of ΔW 99.2–99.8% of min(m, n).",
            "paper": f"{paper.RANK_RANGE[0]}–{paper.RANK_RANGE[1]}%",
            "ours": ", ".join(f"{n} {pct(r)}" for n, r in ranks.items()),
            "verdict": "agrees" if len(ok) == len(ranks) else "partly agrees" if ok else "differs",
            "why": f"nearly full rank = at least {CRITERIA['full_rank']:.0%}; torch.linalg.matrix_rank with its default "
                   "threshold on the bf16 Δ, 2-D non-norm matrices.",
        })

    # 5. layers, matrices, norms
    if "grpo" in rl:
        g = st["grpo"]
        lay = [_at(x, "sparsity") for x in g["bf16"]["layers"] if x["layer"] is not None]
        mats = {x["name"]: x["sparsity"] for x in _matrix_sparsities(g)}
        norm = next((x for x in g["bf16"]["modules"] if x["module"] == "norm"), None)
        norm_sp = _at(norm, "sparsity") if norm else None
        u = CRITERIA["uniform_layers_points"] / 100
        layers_ok = (max(lay) - min(lay)) <= u if lay else True
        mats_ok = (max(mats.values()) - min(mats.values())) <= u if mats else True
        norms_ok = norm_sp is not None and norm_sp >= 0.99
        lo_m = min(mats, key=mats.get) if mats else None
        hi_m = max(mats, key=mats.get) if mats else None
        drift = g["spec"]["learning_rate"] * g["spec"]["steps"]
        half_ulp = 2.0 ** -8  # half a bf16 step at |w| = 1.0 (8 significant bits: a step of 2^-7 in [1, 2))
        if drift < half_ulp:
            norm_txt = (f"A norm weight near 1.0 changes in bf16 only once its master has drifted by half a bf16 step, "
                        f"2^-8 ≈ {half_ulp:.4f}; this run's lr × steps = {drift:.3g} is below that, so Adam's ~lr per step "
                        "cannot get there unless |m̂|/√v̂ stays above 1"
                        + ("" if norms_ok else f", yet {pct(1 - norm_sp)} of the norm weights changed"
                           if norm_sp is not None else "") + ".")
        else:
            norm_txt = (f"This run's lr × steps = {drift:.3g} reaches half a bf16 step at 1.0 (2^-8 ≈ {half_ulp:.4f}), "
                        "so precision alone does not keep norm weights near 1.0 fixed; "
                        + (f"{pct(norm_sp)} of them are unchanged." if norm_sp is not None else
                           "no norm weights were found to measure."))
        out.append({
            "id": "uniform-layers",
            "claim": "All layers and matrices are updated about equally sparsely; layer norms are almost never updated.",
            "paper": "qualitative (Fig. 2)",
            "ours": f"grpo per block {pct(min(lay))}–{pct(max(lay))}; per matrix {pct(mats[lo_m])} ({lo_m}) to "
                    f"{pct(mats[hi_m])} ({hi_m}); norm weights {pct(norm_sp)} unchanged",
            "verdict": "agrees" if layers_ok and mats_ok and norms_ok else
                       "partly agrees" if layers_ok or mats_ok or norms_ok else "differs",
            "why": f"about equal = max − min at most {CRITERIA['uniform_layers_points']:g} points; norms frozen = at least "
                   f"99% unchanged. Blocks {'are' if layers_ok else 'are not'} about equally sparse, matrices "
                   f"{'are' if mats_ok else 'are not'}. " + norm_txt,
        })

    # 6, 7. KL and clipping
    seed_sp = [s_["sparsity"]["bf16"]["1e-05"] for s_ in ((results.get("subnetwork") or {}).get("runs") or {}).values()
               if s_["role"] == "full run, another seed" and s_["of"] == "grpo"]
    spread = (f"GRPO's sparsity over {len(seed_sp) + 1} seeds spans {100 * (max(seed_sp + [sp(st['grpo'])]) - min(seed_sp + [sp(st['grpo'])])):.1f} "
              "points" if seed_sp and "grpo" in st else "one seed: run-to-run spread is not measured here")
    for name, knob, cid in (("grpo-kl", "the KL term", "kl"), ("grpo-noclip", "gradient clipping", "clip")):
        if name in rl and "grpo" in rl:
            d = sp(st[name]) - sp(st["grpo"])
            out.append({
                "id": f"{cid}-little-effect",
                "claim": f"{knob[0].upper() + knob[1:]} has little effect on sparsity.",
                "paper": "qualitative (§5)",
                "ours": f"{name} {pct(sp(st[name]))} vs grpo {pct(sp(st['grpo']))} ({pts(d)})",
                "verdict": "agrees" if abs(d) <= small else "differs",
                "why": f"little effect = within {CRITERIA['small_effect_points']:g} points at atol 1e-5 ({spread}).",
            })

    # 8. in-distribution data / RFT
    if "rft" in st and "sft" in st:
        v_rft, v_sft = sp(st["rft"]), sp(st["sft"])
        lr = st["rft"]["spec"]["learning_rate"]
        extra = ""
        if "rft-matched" in st and "sft-matched" in st:
            extra = (f"; at lr {st['rft-matched']['spec']['learning_rate']:g}: rft-matched {pct(sp(st['rft-matched']))} "
                     f"vs sft-matched {pct(sp(st['sft-matched']))}")
        sparser = v_rft - v_sft > near
        rft_min = CRITERIA["rft_sparse_at_least"]
        as_rl = v_rft >= rft_min
        d_rft, d_sft = st["rft"].get("data") or {}, st["sft"].get("data") or {}
        pools = (f" (a pool of {d_rft['pool']:,} training prompts against sft's {d_sft['pool']:,})"
                 if "pool" in d_rft and "pool" in d_sft else "")
        out.append({
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
        })

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
        out.append({
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
                     f"{pts(max([0.0] + [-d for d in drops])).lstrip('+')})" + "; "
                   + ("it levels off (the second half loses less than half of what the first lost)" if levels else
                      f"it has not levelled off within {steps[-1]} steps"),
        })
        dec_snap = next((d for d in st["grpo"]["decomposition_snapshots"] if d["atol"] == 1e-5), None)
        dec_step = next((d for d in st["grpo"]["decomposition_every_step"] if d["atol"] == 1e-5), None)
        if dec_snap:
            p = paper.DYNAMICS_PRIME
            fine = dec_step or dec_snap

            def trio(d):
                return f"{pct(d['never_share'])} / {pct(d['returned_share'])} / {pct(d['final_share'])}"

            tol = CRITERIA["decomposition_share_points"]
            f = CRITERIA["ever_outside_factor"]

            def near(ours, theirs):  # within tol points and within a factor f: an absolute bar alone lets 0.5% pass for 8%
                return abs(ours - theirs) <= tol and theirs / f <= ours <= theirs * f

            share_ok = {k: near(100 * fine[f"{k}_share"], p[k]) for k in ("never", "returned", "final")}
            ever = 100 * fine["returned_share_of_ever"]
            e_lo, e_hi = paper.EVER_UPDATED_OUTSIDE_FINAL / f, paper.EVER_UPDATED_OUTSIDE_FINAL * f
            ever_ok = e_lo <= ever <= e_hi
            checks = [*share_ok.values(), ever_ok]
            verdict = "agrees" if all(checks) else "partly agrees" if any(checks) else "differs"
            res = "by share: " + ", ".join(
                f"{k} {pct(fine[f'{k}_share'])} vs {p[k]:g}% ({'within' if ok else 'not within'} {tol:g} points and a "
                f"factor {f:g})"
                for k, ok in share_ok.items())
            res += (f"; ending outside the final subnetwork: {ever:.1f}% of the ever-updated parameters against the "
                    f"paper's {paper.EVER_UPDATED_OUTSIDE_FINAL:g}% ({'within' if ever_ok else 'outside'} "
                    f"{e_lo:.3g}–{e_hi:.3g}%)")
            if ever < e_lo:
                mech = (f" Few parameters return here: returning needs a master weight to cross a bf16 rounding boundary "
                        f"and cross back, which {cfg['steps']} steps of a slowly drifting Adam run rarely do; the paper's "
                        "runs are far longer.")
            elif ever > e_hi:
                mech = " More of the ever-updated parameters return here than in the paper."
            else:
                mech = ""
            res_note = (" A change made and undone between two snapshots is invisible to the snapshots, hence the check "
                        "after every step as well (the shares checked above are from it)." if dec_step else
                        " Only snapshots were checked: a change made and undone between two of them is invisible, so the "
                        "returned share is a lower bound.")
            out.append({
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
                       + mech + res_note,
            })

    # 11. precision (later work)
    if "grpo" in rl:
        g = st["grpo"]
        mag = g["magnitude_bf16"]["buckets"]
        lr, T = g["spec"]["learning_rate"], g["spec"]["steps"]
        bound = 512 * lr * T
        above = [b for b in mag if b["lo"] >= bound]
        n_above = sum(b["numel"] for b in above)
        ch_above = sum(b["numel"] * b["p_changed"]["0.0"] for b in above)
        fp32_dense = dense_in_fp32(g)
        bound_ok = n_above == 0 or ch_above / n_above <= CRITERIA["changed_above_bound_at_most"]
        curve = one_curve_gap(results)
        checks = [fp32_dense, bound_ok]
        if curve is None:
            curve_txt = (f"No two trained stages on {cfg['task']} share a learning rate and step count (with a |w| bucket of "
                         f"at least {CRITERIA['one_curve_min_bucket']:,} weights), so one curve per learning rate is not "
                         "tested.")
        else:
            gap, (lr_g, b_g, names_g) = curve
            on_one = gap <= CRITERIA["one_curve_points"] / 100
            checks.append(on_one)
            curve_txt = (f"In the P(changed | |w|) figure's data (atol 0), stages on {cfg['task']} that share a learning rate "
                         f"and step count {'fall' if on_one else 'do not fall'} on one curve whatever the algorithm: the "
                         f"largest gap between two of them in one |w| bucket is {100 * gap:.1f} points (lr {lr_g:g}, |w| in "
                         f"[{b_g['lo']:.3g}, {b_g['hi']:.3g}), among {', '.join(names_g)}; one curve = at most "
                         f"{CRITERIA['one_curve_points']:g} points, over buckets of at least "
                         f"{CRITERIA['one_curve_min_bucket']:,} weights).")
        out.append({
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
                   + (", vacuously: no weight lies above it" if n_above == 0 else "") + "). " + curve_txt,
        })

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
        out.append({
            "id": "accuracy",
            "claim": "RL finetuning improves the task (the premise of the paper's setting).",
            "paper": "gains on their benchmarks",
            "ours": ", ".join(f"{n} (lr {lr:g}) {pts(d)} ± {100 * z:.1f}" for n, lr, d, z in rows)
                    + f" on {th['n']:,} held-out {tsk} problems (bf16 checkpoints)",
            "verdict": "agrees" if len(improved) == len(rows) else "partly agrees" if improved else "differs",
            "why": "an improvement counts when it exceeds two standard errors of the difference (independent binomials; "
                   f"conservative, as the same problems are used). Significant: {', '.join(improved) or 'none'}.",
        })

    out += assess_subnetworks(results)
    return out


# -- the subnetwork phase: accessors and claims

ROLE_LABEL = {"subnetwork re-run": "θ_sub: its own subnetwork", "random-mask re-run": "random mask, equal density",
              "full run, another seed": "full run, another seed"}


def ident(row: dict, atol: float, inside: bool = False, key: str = "identity") -> float | None:
    """Identity of a Table 3 row at ``atol`` (overall, or inside the full run's mask)."""
    rec = next((r for r in row[key] if r["atol"] == atol), None)
    if rec is None:
        return None
    return rec["identity_in_mask"] if inside else rec["identity"]


def _rows(section: dict, role: str) -> list[dict]:
    return [r for r in section["rows"] if r["role"] == role]


def _acc_diff(section: dict, row: dict, task: str) -> tuple[float, float, dict] | None:
    full = section["full_accuracy"].get(task, {}).get("bf16")
    mine = row["accuracy"].get(task, {}).get("bf16")
    if not full or not mine:
        return None
    noise = two_se(full, mine)
    return mine["accuracy"] - full["accuracy"], noise, mine


def assess_subnetworks(results: dict) -> list[dict]:
    """The paper's claims 3 and 4 (Tables 3 and 4), and the baselines later work asks for."""
    sub = results.get("subnetwork")
    out = []
    if not sub:
        return out
    tsk = results["config"]["task"]
    paper3 = paper.TABLE3
    reruns = sub.get("reruns") or {}
    verdicts, parts, whys = [], [], []
    for alg, sec in reruns.items():
        srow = _rows(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        i5, i4 = ident(r, 1e-5), ident(r, 1e-4)
        d = _acc_diff(sec, r, tsk)
        ok5 = i5 >= CRITERIA["identity_1e-5"]
        ok4 = i4 >= 1 - CRITERIA["identity_1e-4_points"] / 100
        ok_acc = d is None or d[0] >= -d[1]
        verdicts.append((ok5, ok4, ok_acc))
        acc_txt = f", {tsk} accuracy {pts(d[0])} vs θ_full (± {100 * d[1]:.1f})" if d else ""
        parts.append(f"{alg}: {pct(i5)} identical at 1e-5, {pct(i4, 2)} at 1e-4, {pct(ident(r, 0.0))} bitwise{acc_txt}")
        whys.append(f"{alg}: 1e-5 {'meets' if ok5 else 'misses'} the bar, 1e-4 {'meets' if ok4 else 'misses'} it, accuracy "
                    f"{'is not lower' if ok_acc else 'is lower by more than two standard errors'}")
    if verdicts:
        full_ok = [all(v) for v in verdicts]
        out.append({
            "id": "subnetwork-suffices",
            "claim": "Training only the subnetwork (same data, hyperparameters and seed) reproduces θ_full: 94.0% (DPO) / "
                     "90.5% (PRIME) of parameters identical at 1e-5, 100% at 1e-4, test accuracy equal or better (Table 3).",
            "paper": f"DPO {paper3['DPO'][1e-5]}% / PRIME {paper3['PRIME'][1e-5]}% at 1e-5; 100% at 1e-4",
            "ours": "; ".join(parts) + " (bf16 checkpoints; masks at atol 1e-5)",
            "verdict": "agrees" if all(full_ok) else "partly agrees" if any(any(v) for v in verdicts) else "differs",
            "why": f"reproduced = identity at 1e-5 at least {100 * CRITERIA['identity_1e-5']:.1f}% (the paper's lower figure), "
                   f"at 1e-4 within {CRITERIA['identity_1e-4_points']:g} points of 100%, and accuracy not lower by more "
                   "than two standard errors. " + "; ".join(whys) + ".",
        })
    # baselines: a random mask of equal density and another seed
    parts, wins, whys = [], [], []
    for alg, sec in reruns.items():
        srow = _rows(sec, "subnetwork re-run")
        if not srow:
            continue
        i_sub = ident(srow[0], 1e-5)
        for role in ("random-mask re-run", "full run, another seed"):
            for b in _rows(sec, role):
                i_b = ident(b, 1e-5)
                win = i_sub - i_b > CRITERIA["beats_baseline_points"] / 100
                wins.append(win)
                parts.append(f"{alg}: θ_sub {pct(i_sub)} vs {b['run']} {pct(i_b)}")
        for b in _rows(sec, "random-mask re-run"):
            d = _acc_diff(sec, b, tsk)
            if d:
                whys.append(f"{b['run']} reaches {pct(d[2]['accuracy'])} {tsk} accuracy, {pts(d[0])} vs θ_full (± {100 * d[1]:.1f})")
    if wins:
        out.append({
            "id": "subnetwork-beats-baselines",
            "claim": "Later work: the subnetwork claim must beat a random mask of equal density (which can train as well on "
                     "small models) and the spread between seeds.",
            "paper": "no random-mask baseline in the paper",
            "ours": "identity with θ_full at 1e-5: " + "; ".join(parts),
            "verdict": "agrees" if all(wins) else "partly agrees" if any(wins) else "differs",
            "why": f"beats = identity at 1e-5 higher by more than {CRITERIA['beats_baseline_points']:g} points. Accuracy, the "
                   "later work's measure: " + ("; ".join(whys) if whys else "not measured") + ".",
        })
    ov = sub.get("overlap")
    if ov:
        comps = [c for c in ov["comparisons"] if c["group"] != "control" and c["o1"] is not None and c["o2"] is not None]
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
            parts.append(f"{g}: " + ", ".join(f"{c['a']}/{c['b']} {pct(c['o1'])}/{pct(c['o2'])} vs {pct(c['chance_o1'])}/"
                                              f"{pct(c['chance_o2'])} (reach {c['reach']:.2f})" for c in cs)
                         + f" — {n_far} of {len(cs)} far above")
        pr = [c["paper"] for c in ov["comparisons"] if c.get("paper")]
        paper_reach = [p_["reach"] for p_ in pr]
        out.append({
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
        })
        shares = [c["magnitude_explains_share_of_excess"] for c in comps if c["magnitude_explains_share_of_excess"] is not None
                  and far(c)]
        if shares:
            med = sorted(shares)[len(shares) // 2]
            beyond = [c for c in comps if c["o1_over_magnitude_chance"] and c["o1_over_magnitude_chance"] > 1.05]
            out.append({
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
            })
    return out


def commuted_twins_lines(results: dict) -> list[str]:
    """How 'held out' the held-out addition problems are: a+b is never trained on, but b+a may be."""
    from rlsubnet.lab.tasks import get_task

    tasks = [results["config"]["task"], results["config"].get("second_task")]
    if "add" not in tasks:
        return []
    add = get_task("add")
    train = {p.prompt for p in add.split("train")}
    held = [p.prompt for p in add.split("heldout")]
    asym = [q for q in held if q.split("+")[0] != q.split("+")[1].rstrip("=")]
    twins = sum(1 for q in asym if f"{q.split('+')[1].rstrip('=')}+{q.split('+')[0]}=" in train)
    return [f"- The held-out addition problems are never trained on as written, but addition commutes: for {twins:,} of the "
            f"{len(asym):,} held-out problems a+b with a ≠ b ({twins / len(asym):.0%}), the training split holds b+a. "
            "Held-out accuracy measures unseen strings, not unseen pairs of operands."]


def one_curve_gap(results: dict) -> tuple[float, tuple[float, dict, list[str]]] | None:
    """The largest gap in P(changed | |w| bucket) (bf16, atol 0) between trained stages on the main task that share a
    learning rate and step count, over buckets of at least ``CRITERIA["one_curve_min_bucket"]`` weights.

    Returns (gap, (learning rate, bucket, stage names of that group)), or None when no group of two or more stages has
    a bucket that large.
    """
    st = results["stages"]
    groups: dict[tuple, list[str]] = {}
    for n, s in st.items():
        if s["spec"]["task"] == results["config"]["task"] and trained(s) and s.get("magnitude_bf16"):
            groups.setdefault((s["spec"]["learning_rate"], s["spec"]["steps"]), []).append(n)
    best = None
    for (lr, _), names in groups.items():
        if len(names) < 2:
            continue
        by_bucket: dict[tuple, list[float]] = {}
        sizes: dict[tuple, tuple[int, dict]] = {}
        for n in names:
            for b in st[n]["magnitude_bf16"]["buckets"]:
                key = (b["lo"], b["hi"])
                by_bucket.setdefault(key, []).append(b["p_changed"]["0.0"])
                sizes[key] = (b["numel"], b)
        for key, ps in by_bucket.items():
            numel, b = sizes[key]
            if numel < CRITERIA["one_curve_min_bucket"] or len(ps) < 2:
                continue
            gap = max(ps) - min(ps)
            if best is None or gap > best[0]:
                best = (gap, (lr, b, names))
    return best


def _matrix_sparsities(stage: dict) -> list[dict]:
    """Per 2-D matrix sparsity at 1e-5 (norms and embeddings excluded), from the stage's per-module records."""
    return stage.get("matrices", [])


# -- figures


def _fig_sparsity_vs_paper(results):
    plt = plots._pyplot()
    st = results["stages"]
    names = list(st)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.35 * max(len(names), len(paper.TABLE1)) + 1.8),
                                   gridspec_kw={"width_ratios": [1, 1]})
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
    fig.suptitle("Update sparsity per stage, beside the paper's Table 1\n" + settings_of(results, extra="bf16, atol 1e-5"),
                 fontsize=9)
    fig.tight_layout()
    return fig


def _fig_sft_vs_rl(results):
    """Bars grouped by learning rate: within a group, only the algorithm and the data differ."""
    plt = plots._pyplot()
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
            ax.bar(x, 100 * sp(st[n]), color="tab:blue" if rl else "tab:orange", hatch="//" if own else None,
                   edgecolor="black", linewidth=0.5)
            ax.text(x, 100 * sp(st[n]) + 1, f"{100 * sp(st[n]):.1f}", ha="center", fontsize=8)
            ticks.append(x)
            labels.append(n)
            x += 1
        ax.text((start + x - 1) / 2, 101, f"lr {lr:g}" + (" (RL lr)" if lr == c["rl_lr"] else " (SFT lr)" if lr == c["sft_lr"] else ""),
                ha="center", fontsize=8, fontweight="bold")
        x += 0.8
    ax.set_xticks(ticks, labels, rotation=25, ha="right", fontsize=8)
    ax.axhspan(*paper.RL_RANGE, color="tab:blue", alpha=0.08, label="paper: RL 68.5–96%")
    ax.axhspan(*paper.SFT_RANGE, color="tab:orange", alpha=0.12, label="paper: SFT 6–15%")
    ax.axhline(paper.RFT_SPARSITY, color="tab:green", linestyle=":", label="paper: RFT 91.2%")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="tab:blue", label="RL (GRPO, DPO)"), Patch(facecolor="tab:orange", label="SFT"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="trained on θ0's own samples")]
    ax.set_ylim(0, 108)
    ax.set_ylabel("sparsity (%), bf16, atol 1e-5")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("SFT vs RL at the usual and at matched learning rates\n"
                 + settings_of(results, main_task, "same steps, batch and data seed for every bar"), fontsize=9)
    return fig


def _fig_sparsity_vs_step(results):
    plt = plots._pyplot()
    st = results["stages"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for n, s in st.items():
        curve = s["sparsity_vs_step"]
        line, = ax1.plot([p["step"] for p in curve], [100 * p["sparsity"]["1e-05"] for p in curve], marker=".", label=n)
        ax1.plot([p["step"] for p in curve], [100 * p["sparsity"]["0.0"] for p in curve], linestyle=":", color=line.get_color())
        steps = s["step_to_step"]
        if steps:
            ax2.plot([r["step"] for r in steps], [100 * r["sparsity_vs_previous_step"]["0.0"] for r in steps],
                     color=line.get_color(), linewidth=0.9, label=n)
    ax1.set_xlabel("optimizer step (snapshots)")
    ax1.set_ylabel("sparsity against θ0 (%)")
    ax1.set_title(f"against θ0, every {results['config']['snapshot_every']} steps (solid: atol 1e-5, dotted: atol 0)", fontsize=9)
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
    return plots.heatmap(g["layers"], g["modules"], g["sparsity_1e-05"], f"Sparsity per layer and module: {name}",
                         s["settings"] + "; bf16, atol 1e-5")


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
    fig = plots.sparsity_vs_atol(series, "Sparsity vs tolerance (cf. the paper's Table 6; dashed: the paper)",
                                 settings_of(results, extra="bf16 unless noted"), reference=ref)
    ax = fig.axes[0]
    cmap = plots._pyplot().get_cmap("tab20")
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
    plt = plots._pyplot()
    st = results["stages"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    shown = [n for n in ("grpo", "dpo", "sft-matched", "grpo-sftlr", "sft", "rft") if n in st]
    for n in shown:
        buckets = [b for b in st[n]["magnitude_bf16"]["buckets"] if b["lo"] > 0 and b["hi"]]
        x = [_bucket_mid(b) for b in buckets]
        line, = ax.plot(x, [b["p_changed"]["0.0"] for b in buckets], marker="o", markersize=3, label=f"{n} (atol 0)")
        ax.plot(x, [b["p_changed"]["1e-05"] for b in buckets], linestyle="--", color=line.get_color(), linewidth=0.8)
    if "grpo" in st:
        buckets = [b for b in st["grpo"]["magnitude_fp32"]["buckets"] if b["lo"] > 0 and b["hi"]]
        ax.plot([_bucket_mid(b) for b in buckets], [b["p_changed"]["0.0"] for b in buckets], color="black",
                linestyle=":", label="grpo fp32 masters (atol 0)")
    T = results["config"]["steps"]
    for lr, style in sorted({(st[n]["spec"]["learning_rate"], None) for n in shown}):
        ax.axvline(512 * lr * T, color="grey", linewidth=0.8)
        ax.text(512 * lr * T, 1.02, f"512·lr·T\n(lr {lr:g})", fontsize=6, ha="center", va="bottom")
    ax.axvline(2 ** -9, color="tab:red", linewidth=0.6, linestyle="-.")
    ax.text(2 ** -9, 0.45, "2^-9 ", fontsize=6, color="tab:red", ha="right")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.12)
    ax.set_xlabel("|w| in θ0 (bucket of one binade)")
    ax.set_ylabel("P(changed)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("P(weight changed | |w|): solid atol 0, dashed atol 1e-5 (below |w| = 2^-9 one bf16 step is < 1e-5)\n" + settings_of(results, shown, "bf16 unless noted"),
                 fontsize=9)
    return fig


def _fig_dynamics(results):
    plt = plots._pyplot()
    st = results["stages"]
    rows = []
    for n, s in st.items():
        for label, key in ((f"every {s['snapshot_every']} steps", "decomposition_snapshots"), ("every step", "decomposition_every_step")):
            d = next((d for d in s.get(key, []) if d["atol"] == 1e-5), None)
            if d:
                rows.append((f"{n} ({label})", 100 * d["never_share"], 100 * d["returned_share"], 100 * d["final_share"]))
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
    ax.set_title("Never changed / changed and returned / final subnetwork\n" + settings_of(results, extra="bf16, atol 1e-5"),
                 fontsize=9, pad=22)
    return fig


def _fig_bf16_vs_fp32(results):
    plt = plots._pyplot()
    st = results["stages"]
    names = list(st)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(names)), 4.2))
    width = 0.2
    series = (("bf16, atol 1e-5", "bf16", 1e-5), ("bf16, atol 0", "bf16", 0.0), ("fp32, atol 1e-5", "fp32", 1e-5),
              ("fp32, atol 0", "fp32", 0.0))
    for j, (label, dt, a) in enumerate(series):
        ax.bar([i + (j - 1.5) * width for i in range(len(names))], [100 * sp(st[n], a, dt) for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("What bf16 hides: the same runs compared in bf16 and in fp32 (fp32 masters vs θ0)\n" + settings_of(results),
                 fontsize=9)
    return fig


def _fig_pretrain(results):
    plt = plots._pyplot()
    th = results["theta0"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    curve = th["curve"]
    for t in (curve[0]["validation_accuracy"] if curve else {}):
        ax.plot([p["step"] for p in curve], [100 * p["validation_accuracy"][t] for p in curve], marker=".", label=f"{t} (validation)")
    ax.axhline(100 * th["spec"]["target_accuracy"], color="grey", linestyle="--", label="target")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("greedy accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    c = results["config"]
    ax.set_title("Pretraining θ0 until validation accuracy reaches the target\n" + th["settings"]
                 + f"; size {c['size']} ({th['parameters']:,} params); validation accuracy of the fp32 training weights, "
                 "θ0 saved in bf16", fontsize=7, wrap=True)
    return fig


def _fig_accuracy(results):
    plt = plots._pyplot()
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
        ax.bar([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(names))], vals, width, yerr=errs, capsize=2,
               label=f"{t} (held out, n={results['theta0']['accuracy'][t]['bf16']['n']:,})")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("greedy accuracy (%) ± 2 SE")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("Held-out accuracy of the bf16 checkpoints\n" + settings_of(results), fontsize=9)
    return fig


def _sub_settings(results: dict, names: Sequence[str] | None = None) -> str:
    """Settings line of a subnetwork figure: every learning rate, step count and seed among ``names``' runs."""
    c = results["config"]
    specs = [x for x in (_spec_of(results, n) for n in (names or [])) if x is not None]
    if not specs:
        specs = [{"learning_rate": c["rl_lr"], "steps": c["steps"], "batch_size": c["batch_size"], "seed": c["seed"]}]

    def vals(key):
        return ", ".join(f"{v:g}" for v in sorted({x[key] for x in specs}))

    return (f"size {c['size']} ({results['theta0']['parameters']:,} params), {vals('steps')} steps, batch "
            f"{vals('batch_size')}, lr {vals('learning_rate')}, seed {vals('seed')};\nbf16 checkpoints, masks at atol 1e-5 "
            "against θ0")


def _fig_identity(results):
    """Table 3 as bars: identity with θ_full per run and atol, overall (bars) and inside the mask (dots)."""
    plt = plots._pyplot()
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
            ax.scatter(xs, [100 * (ident(r, a, True) or 0) for r in rows], color="black", marker="_", s=90, zorder=3,
                       label="inside the mask" if j == 0 else None)
            for x, r in zip(xs, rows):
                ax.text(x, 100 * ident(r, a) + 0.6, f"{100 * ident(r, a):.1f}", ha="center", fontsize=6, rotation=90)
        for label, vals, style in (("paper DPO", paper.TABLE3["DPO"], "--"), ("paper PRIME", paper.TABLE3["PRIME"], ":")):
            ax.axhline(vals[1e-5], color="tab:blue", linestyle=style, linewidth=0.9, label=f"{label}, 1e-5: {vals[1e-5]}%")
        ax.axhline(100, color="tab:green", linestyle="--", linewidth=0.9, label="paper, 1e-4: 100%")
        short = {"subnetwork re-run": "θ_sub", "random-mask re-run": "random mask", "full run, another seed": "another seed"}
        ax.set_xticks(range(len(rows)), [f"{r['run']}\n({short.get(r['role'], r['role'])})" for r in rows], fontsize=7)
        vals = [ident(r, a, inside) for r in rows for a in atols for inside in (False, True)]
        lo = 100 * min(v for v in vals if v is not None)
        ax.set_ylim(max(0, lo - 10), 108)
        ax.set_ylabel(f"identical to θ_full = `{sec['full']}` (%)")
        ax.set_title(f"{alg.upper()}: re-runs from θ0 vs the full run (mask density {pct(sec['mask']['density'])})", fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    names = [n for sec in sub["reruns"].values() for n in [sec["full"]] + [r["run"] for r in sec["rows"]]]
    fig.suptitle("Subnetwork re-runs vs θ_full (the paper's Table 3): share of parameters with |θ_full − θ| ≤ atol\n"
                 + _sub_settings(results, names), fontsize=9)
    fig.tight_layout()
    return fig


def _fig_overlap(results, which: str):
    from rlsubnet.report.overlap_outputs import _ratio_matrix, matrix_heatmap

    ov = results["subnetwork"]["overlap"]
    labels = ov["labels"]
    m = ov["matrix"]
    settings = _sub_settings(results, labels)
    if which == "o1":
        return matrix_heatmap(labels, m["o1"], "Subnetwork overlap o1 = |A∩B| / |A| (%), row A, column B", settings,
                              cbar_label="o1 (%)", vmax=100)
    ratio = _ratio_matrix(m["o1"], m["magnitude_chance_o1"] if which == "magnitude" else m["chance_o1"])
    title = ("o1 / magnitude-matched chance (1 = explained by |w| in θ0), row A, column B" if which == "magnitude"
             else "o1 / density chance (the paper's baseline; 1 = chance), row A, column B")
    return matrix_heatmap(labels, ratio, title, settings, cbar_label="× chance", percent=False)


# Where each figure's numbers live in results.json (the figure records repeat this as "data").
FIGURE_DATA = {
    "sparsity_vs_paper": "stages.<name>.sparsity.bf16 ('1e-05', '0.0'); the paper's Table 1 (report.paper_numbers)",
    "sft_vs_rl": "stages.<name>.sparsity.bf16['1e-05'] and stages.<name>.spec.learning_rate",
    "sparsity_vs_step": "stages.<name>.sparsity_vs_step (snapshots) and stages.<name>.step_to_step (every step)",
    "sparsity_vs_atol": "stages.<name>.sparsity.bf16 / .fp32 for every atol; the paper's Table 6",
    "p_changed_vs_magnitude": "stages.<name>.magnitude_bf16 / magnitude_fp32",
    "dynamics": "stages.<name>.decomposition_snapshots / decomposition_every_step",
    "bf16_vs_fp32": "stages.<name>.sparsity.bf16 / .fp32",
    "accuracy": "theta0.accuracy and stages.<name>.accuracy",
    "pretrain": "theta0.curve",
    "heatmap": "stages.<name>.grid",
    "subnetwork_identity": "subnetwork.reruns.<algorithm>.rows[].identity (bf16) and the paper's Table 3 (report.paper_numbers)",
    "overlap_o1": "subnetwork.overlap.matrix.o1 (rows A, columns B); pairs in subnetwork.overlap.pairs",
    "overlap_o1_over_chance": "subnetwork.overlap.matrix.o1 / .chance_o1",
    "overlap_o1_over_magnitude_chance": "subnetwork.overlap.matrix.o1 / .magnitude_chance_o1",
}
SUBNETWORK_FIGURES = {
    "subnetwork_identity": ("Subnetwork re-runs vs θ_full (Table 3)", _fig_identity),
    "overlap_o1": ("Subnetwork overlap o1 (Table 4)", lambda r: _fig_overlap(r, "o1")),
    "overlap_o1_over_chance": ("Overlap over the density chance", lambda r: _fig_overlap(r, "chance")),
    "overlap_o1_over_magnitude_chance": ("Overlap over the magnitude-matched chance", lambda r: _fig_overlap(r, "magnitude")),
}

FIGURES = {
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


def render_figures(results: dict) -> dict[str, tuple[bytes, dict]]:
    """file name -> (PNG bytes, record for results.json)."""
    prov = {"rlsubnet_version": __version__, "config": results["config"]}
    out = {}
    todo = [(k, title, fn) for k, (title, fn) in FIGURES.items()]
    todo += [(f"heatmap_{n}", f"Layer × module sparsity: {n}", (lambda r, n=n: _fig_heatmap(r, n)))
             for n in HEATMAP_STAGES if n in results["stages"]]
    sub = results.get("subnetwork") or {}
    for key, (title, fn) in SUBNETWORK_FIGURES.items():
        if (key == "subnetwork_identity" and sub.get("reruns")) or (key.startswith("overlap") and sub.get("overlap")):
            todo.append((key, title, fn))
    for key, title, fn in todo:
        fig = fn(results)
        # The settings are part of every figure's title; the record repeats them for readers of results.json.
        caption = fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()
        data = FIGURE_DATA["heatmap" if key.startswith("heatmap_") else key]
        out[f"{key}.png"] = (plots.to_png(fig, {**prov, "figure": key}), {"title": title, "caption": caption, "data": data})
    return out


# -- markdown


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _spec_of(results: dict, name: str) -> dict | None:
    sub = results.get("subnetwork") or {}
    if name in results["stages"]:
        return results["stages"][name]["spec"]
    if name in (sub.get("runs") or {}):
        return sub["runs"][name]["spec"]
    return None


def _short_settings(results: dict, name: str) -> str:
    sp_ = _spec_of(results, name)
    if sp_ is None:
        return ""
    bits = [sp_["algorithm"].upper(), f"lr {sp_['learning_rate']:g}", f"seed {sp_['seed']}", sp_["task"]]
    return ", ".join(bits)


def _paper_reach_range() -> str:
    from rlsubnet.lab.subnet import reach

    vals = [reach(r[2] / 100, r[3] / 100, r[5] / 100, r[4] / 100)["reach"] for r in paper.TABLE4]
    return f"{min(vals):.2f}–{max(vals):.2f}"


def _full_gain(results: dict, sec: dict, task: str) -> tuple[float, float, float] | None:
    """θ_full's held-out accuracy minus θ0's (bf16), two standard errors of that difference, and θ_full's lr."""
    full = sec["full_accuracy"].get(task, {}).get("bf16")
    base = results["theta0"]["accuracy"].get(task, {}).get("bf16")
    spec = _spec_of(results, sec["full"])
    if not full or not base or spec is None:
        return None
    noise = two_se(full, base)
    return full["accuracy"] - base["accuracy"], noise, spec["learning_rate"]


def _algo(results: dict, name: str) -> str | None:
    return (_spec_of(results, name) or {}).get("algorithm")


def subnetwork_differences(results: dict) -> list[str]:
    """Plain statements of where Tables 3 and 4 come out differently from the paper's, from the measured numbers."""
    sub = results.get("subnetwork") or {}
    tsk = results["config"]["task"]
    out = []
    for alg, sec in (sub.get("reruns") or {}).items():
        srow = _rows(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        i5, i4 = ident(r, 1e-5), ident(r, 1e-4)
        lo5 = min(v[1e-5] for v in paper.TABLE3.values()) / 100
        hi5 = max(v[1e-5] for v in paper.TABLE3.values()) / 100
        if i5 > hi5:
            out.append(f"- {alg.upper()}: θ_sub is *more* identical to θ_full at 1e-5 than in the paper ({pct(i5)} vs "
                       f"{pct(lo5)}–{pct(hi5)}), on a {results['config']['steps']}-step run of a tiny model.")
        elif i5 < lo5:
            out.append(f"- {alg.upper()}: θ_sub is less identical to θ_full at 1e-5 than in the paper ({pct(i5)} vs "
                       f"{pct(lo5)}–{pct(hi5)}).")
        if i4 < 1.0:
            n = next(x for x in r["identity"] if x["atol"] == 1e-4)
            out.append(f"- {alg.upper()}: not 100% at 1e-4 as in the paper: {n['numel'] - n['identical']:,} of "
                       f"{n['numel']:,} entries ({pct(1 - i4, 2)}) differ by more than 1e-4.")
        f32 = ident(r, 1e-5, key="identity_fp32_masters")
        seeds = [ident(b, 1e-5, key="identity_fp32_masters") for b in _rows(sec, "full run, another seed")]
        if seeds and f32 <= max(seeds):
            out.append(f"- {alg.upper()}: the reproduction holds in bf16 only. Between the fp32 masters, θ_sub matches "
                       f"θ_full at 1e-5 in {pct(f32)} of entries and another seed's full run in {pct(max(seeds))}: the "
                       "paper's test cannot see this, as it compares bf16 checkpoints.")
        gain = _full_gain(results, sec, tsk)
        for b in _rows(sec, "random-mask re-run"):
            d = _acc_diff(sec, b, tsk)
            if d and abs(d[0]) <= d[1]:
                line = (f"- {alg.upper()}: accuracy does not tell the subnetwork from a random mask here: `{b['run']}` "
                        f"reaches {pct(d[2]['accuracy'])} against θ_full's {pct(d[2]['accuracy'] - d[0])} (± "
                        f"{100 * d[1]:.1f} points), as later work found")
                if gain is not None:
                    g_, z_, lr_ = gain
                    line += (f"; RL at this learning rate (lr {lr_:g}) barely moves accuracy: θ_full gains {pts(g_)} "
                             f"over θ0 (± {100 * z_:.1f}, two standard errors)" if abs(g_) <= z_ else
                             f"; θ_full itself moves accuracy by {pts(g_)} from θ0 (± {100 * z_:.1f}, two standard "
                             "errors), more than the noise")
                out.append(line + ".")
    ov = sub.get("overlap")
    if ov:
        comps = ov["comparisons"]
        papered = [c for c in comps if c.get("paper") and c.get("reach") is not None]
        if papered:
            ours = [c["reach"] for c in papered]
            theirs = [c["paper"]["reach"] for c in papered]
            if min(ours) > max(theirs):
                out.append(f"- The overlaps sit much further above the paper's chance than the paper's own (reach "
                           f"{min(ours):.2f}–{max(ours):.2f} against {min(theirs):.2f}–{max(theirs):.2f}), but the paper's "
                           "chance ignores weight magnitude: "
                           + "; ".join(f"{c['what']}: o1 {pct(c['o1'])}, density chance {pct(c['chance_o1'])}, magnitude-"
                                       f"matched chance {pct(c['magnitude_chance_o1'])}" for c in papered[:1] + [
                                           c for c in papered if c["group"] != "seeds"]) + ".")
        data = [c for c in comps if c["group"] == "data" and c["o1_over_magnitude_chance"]]

        def at_rl(c):
            a, b = _spec_of(results, c["a"]) or {}, _spec_of(results, c["b"]) or {}
            return (a.get("learning_rate") == b.get("learning_rate") == results["config"]["rl_lr"]
                    and a.get("task") is not None and a.get("task") == b.get("task"))

        same = [c for c in comps if c["group"] in ("seeds", "algorithm") and c["o1_over_magnitude_chance"] and at_rl(c)]
        if data and same:
            algos = {id(c): {_algo(results, c["a"]), _algo(results, c["b"])} for c in same}
            sft_rows = [c for c in same if "sft" in algos[id(c)]]
            sft_grpo = [c for c in same if algos[id(c)] == {"sft", "grpo"}]
            grpo_dpo = [c for c in same if algos[id(c)] == {"grpo", "dpo"}]
            ratios = [c["o1_over_magnitude_chance"] for c in same]
            d_ratio = max(c["o1_over_magnitude_chance"] for c in data)
            sft_txt = ", ".join(f"{c['a']}/{c['b']} {c['o1_over_magnitude_chance']:.2f}×" for c in sft_rows)
            margin = CRITERIA["same_algorithm_margin"]
            below = d_ratio < min(ratios)
            algo_gap = (max(abs(x["o1_over_magnitude_chance"] - y["o1_over_magnitude_chance"]) for x in sft_grpo
                            for y in grpo_dpo) if sft_grpo and grpo_dpo else None)
            line = (f"- Beyond weight magnitude, subnetworks trained on one task at the RL learning rate share "
                    f"{min(ratios):.2f}–{max(ratios):.2f}× the magnitude-matched chance, subnetworks of the two tasks "
                    + ("only " if below else "") + ", ".join(f"{c['o1_over_magnitude_chance']:.2f}×" for c in data)
                    + (f"; SFT at the RL learning rate and RL: {sft_txt}" if sft_rows else ""))
            if algo_gap is not None:
                gd_txt = ", ".join(f"{c['a']}/{c['b']} {c['o1_over_magnitude_chance']:.2f}×" for c in grpo_dpo)
                line += f"; GRPO vs DPO {gd_txt}, at most {algo_gap:.2f}× from every SFT-vs-GRPO ratio"
            if below and algo_gap is not None and algo_gap <= margin:
                line += (": what the masks share beyond |w| follows the task data, not the RL algorithm (the two-task "
                         f"ratio is below every same-task one, and swapping RL for SFT moves the ratio by {algo_gap:.2f}×, "
                         f"within the {margin:.2f}× margin).")
            else:
                why_not = []
                if not below:
                    why_not.append("the two-task ratio is not below every same-task one")
                if algo_gap is None:
                    why_not.append("no SFT-vs-GRPO and GRPO-vs-DPO pair at the RL learning rate to compare")
                elif algo_gap > margin:
                    why_not.append(f"SFT-vs-GRPO and GRPO-vs-DPO differ by more than {margin:.2f}×")
                line += (". Whether the shared part follows the task data rather than the algorithm is not settled here: "
                         + "; ".join(why_not) + ".")
            out.append(line)
    return out


def _why_fp32(results: dict, sec: dict) -> str:
    """Why θ_sub can match θ_full in bf16 and not in fp32, said only as far as this run's numbers show it."""
    full = results["stages"].get(sec["full"])
    if full is None:
        return "."
    kept32 = sp(full, 0.0, "fp32")  # masters of the full run bitwise equal to θ0
    if dense_in_fp32(full):
        return (f": the full run moved all but {pct(kept32, 3)} of its masters away from θ0, yet its bf16 checkpoint "
                f"still equals θ0 in {pct(sp(full, 0.0))} of the entries (those masters moved by less than half a bf16 "
                "step), while the re-run left every master outside M at θ0; so the Table 3 identity is a property of the "
                "bf16 checkpoints the paper compares, not of the trained weights.")
    return (f"; the full run left {pct(kept32)} of its masters bitwise at θ0 (bf16: {pct(sp(full, 0.0))}), so the "
            "difference is not only rounding.")


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
        f"checkpoints, overall and among M's entries; accuracy: greedy exact match on the held-out split.")
    md.append("")
    headers = ["algorithm", "run", "what", "identity @0", "@1e-5", "@1e-4", "inside M @0", "@1e-5", "@1e-4",
               f"{tsk} acc", "Δ acc vs θ_full", "fp32 masters outside the trained mask"]
    rows = []
    for alg, sec in sub["reruns"].items():
        fa = sec["full_accuracy"][tsk]["bf16"]
        rows.append([alg.upper(), f"`{sec['full']}` (θ_full)", f"full run; M has density {pct(sec['mask']['density'])} "
                     f"({sec['mask']['changed']:,} of {sec['mask']['numel']:,})", "100%", "100%", "100%", "100%", "100%", "100%",
                     pct(fa["accuracy"]), "", ""])
        for r in sec["rows"]:
            d = _acc_diff(sec, r, tsk)
            fm = r.get("frozen_masters")
            rows.append([alg.upper(), f"`{r['run']}`", ROLE_LABEL.get(r["role"], r["role"]),
                         pct(ident(r, 0.0)), pct(ident(r, 1e-5)), pct(ident(r, 1e-4), 2),
                         pct(ident(r, 0.0, True)), pct(ident(r, 1e-5, True)), pct(ident(r, 1e-4, True), 2),
                         pct(r["accuracy"][tsk]["bf16"]["accuracy"]),
                         f"{pts(d[0])} (± {100 * d[1]:.1f})" if d else "–",
                         (f"{fm['frozen_entries_checked'] - fm['frozen_entries_moved']:,} of {fm['frozen_entries_checked']:,} "
                          "bit-identical to θ0") if fm else "– (full run)"])
    for alg, vals in paper.TABLE3.items():
        rows.append([f"paper: {alg}", "θ_sub", "7B-scale models, their runs", "–", f"{vals[1e-5]}%", f"{vals[1e-4]:g}%",
                     "–", "–", "–", "–", "equal or better", "–"])
    md.append(_table(headers, rows))
    md.append("")
    md.append("Two standard errors of an accuracy difference are given in brackets (independent binomials; conservative, "
              "as the same problems are used). Inside M: identity among the full run's subnetwork entries only (outside M, "
              "a re-run on M is θ0 and θ_full's bf16 checkpoint is within 1e-5 of θ0, M's own test, so from atol 1e-5 on "
              "identity there is 100% by construction; at atol 0 the changes of at most 1e-5 that M leaves out count; a "
              "random-mask re-run and another seed can differ anywhere). The fp32 check compares every master weight outside the "
              "mask the run trained on with θ0's value, bit for bit, after training.")
    extra_lines = []
    for alg, sec in sub["reruns"].items():
        srow = _rows(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        f32 = {b["run"]: ident(b, 1e-5, key="identity_fp32_masters") for b in sec["rows"]}
        f32_4 = [ident(b, 1e-4, key="identity_fp32_masters") for b in sec["rows"]]
        others = [f32[b["run"]] for b in sec["rows"] if b["role"] == "full run, another seed"]
        closer = others and f32[r["run"]] > max(others)
        line = (f"- Compared in fp32 (the master weights before rounding to bf16), identity with `{sec['full']}`'s masters at "
                "1e-5: " + ", ".join(f"`{n}` {pct(v)}" for n, v in f32.items())
                + f"; at 1e-4, {pct(min(f32_4))}–{pct(max(f32_4))}. "
                + ("In fp32 the subnetwork re-run is also the closest to θ_full." if closer else
                   "In fp32 the subnetwork re-run is *not* closer to θ_full than another seed's full run" + _why_fp32(results, sec)))
        if alg == "grpo":
            if r.get("first_step_reward_differs"):
                line += (f" GRPO's sampled completions first differ from the full run's at step {r['first_step_reward_differs']} "
                         "(the mean reward logged there differs); from then on the two runs train on different samples.")
            else:
                line += " Its logged rewards equal the full run's at every step (the same sampled completions throughout)."
        extra_lines.append(line)
    seeds = [(n, r) for n, r in (sub.get("runs") or {}).items() if r["role"] == "full run, another seed"]
    if seeds:
        extra_lines.append("- Run-to-run spread of the full runs' sparsity (bf16, atol 1e-5): " + "; ".join(
            f"{of} {pct(sp(results['stages'][of]))}, " + ", ".join(f"{n} {pct(r['sparsity']['bf16']['1e-05'])}"
                                                                   for n, r in seeds if r["of"] == of)
            for of in dict.fromkeys(r["of"] for _, r in seeds) if of in results["stages"]) + "; held-out "
            f"{tsk} accuracy " + ", ".join(f"{n} {pct(r['accuracy'][tsk]['bf16']['accuracy'])}" for n, r in seeds) + ".")
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
            "(o1 − density chance). The paper's Table 4 is DPO on Tulu-3-8B-SFT (its 'algorithm' row: DPO vs PRIME).")
        md.append("")
        headers = ["comparison", "A", "B", "o1", "o2", "Jaccard", "density chance o1 / o2", "magnitude chance o1 / o2",
                   "reach", "o1 ÷ magnitude chance", "explained by |w|", "paper: o1 / o2 (chance; reach)"]

        def num(x, fmt):
            return "–" if x is None else format(x, fmt)

        rows = []
        for cmp_ in ov["comparisons"]:
            pp = cmp_.get("paper")
            rows.append([f"{cmp_['group']}: {cmp_['what']}", f"`{cmp_['a']}` ({pct(cmp_['density_a'])})",
                         f"`{cmp_['b']}` ({pct(cmp_['density_b'])})", pct(cmp_["o1"]), pct(cmp_["o2"]), pct(cmp_["jaccard"]),
                         f"{pct(cmp_['chance_o1'])} / {pct(cmp_['chance_o2'])}",
                         f"{pct(cmp_['magnitude_chance_o1'])} / {pct(cmp_['magnitude_chance_o2'])}",
                         num(cmp_.get("reach"), ".2f"),
                         f"{num(cmp_['o1_over_magnitude_chance'], '.2f')}×",
                         pct(cmp_["magnitude_explains_share_of_excess"], 0),
                         (f"{100 * pp['o1']:.1f} / {100 * pp['o2']:.1f} ({100 * pp['chance_o1']:.1f} / {100 * pp['chance_o2']:.1f}; "
                          f"{pp['reach']:.2f}) — {pp['what']}") if pp else ""])
        md.append(_table(headers, rows))
        md.append("")
        md.append("Density in brackets. Settings of each mask's stage: " + "; ".join(
            f"`{l}` {_short_settings(results, l) or (ov['settings']['masks'][i].get('kind') or '')}"
            for i, l in enumerate(ov["labels"])) + f"; all {c['steps']} steps, batch {c['batch_size']}, from the same θ0. "
            "The random mask is a control: its overlap with any mask should sit at the density chance.")
        seeds = next((x for x in ov["comparisons"] if x["group"] == "seeds"), None)
        if seeds and seeds.get("modules"):
            md += ["", f"Per module, {seeds['what']} (`{seeds['a']}` vs `{seeds['b']}`; every pair's per-layer and per-module "
                       "rows are in results.json, `subnetwork.overlap.pairs`):", ""]
            mrows = [[m["module"], f"{m['numel']:,}", pct(m["density_a"]), pct(m["o1"]), pct(m["chance_o1"]),
                      pct(m.get("magnitude_chance_o1"))] for m in seeds["modules"]]
            md.append(_table(["module", "entries", f"density of {seeds['a']}", "o1", "density chance o1",
                              "magnitude chance o1 (within the module)"], mrows))
    return md


def fp32_explains_sparsity(results: dict) -> bool:
    """Whether every trained stage is dense in fp32 (bitwise) and well below its bf16 bitwise sparsity there."""
    st = [s for s in results["stages"].values() if trained(s)]
    return bool(st) and all(_fp32_dense(s) for s in st)


def _fp32_dense(s: dict) -> bool:
    return dense_in_fp32(s) and sp(s, 0.0, "fp32") <= CRITERIA["fp32_at_most_of_bf16"] * sp(s, 0.0)


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
        out.append(f"- At lr {lr:g} for {c['steps']} steps, every stage on {c['task']} keeps {pct(min(vals))}–{pct(max(vals))} "
                   f"of its bf16 parameters unchanged at atol 1e-5 ({', '.join(f'{n} {pct(sp(st[n]))}' for n in names)}).")
    unchanged32 = {n: next(g for g in s["fp32"]["global"] if g["atol"] == 0.0) for n, s in st.items() if trained(s)}
    if unchanged32:
        worst = max(unchanged32, key=lambda n: unchanged32[n]["sparsity"])
        g = unchanged32[worst]
        line = (f"- Compared in fp32 (master weights against θ0), the stage with the most exactly-unchanged parameters "
                f"({worst}) has {g['numel'] - g['changed']:,} of {g['numel']:,} ({pct(g['sparsity'], 3)})")
        if fp32_explains_sparsity(results):
            line += (": the sparsity above is what rounding to bf16 lets through, not weights the optimizer left alone "
                     f"(every stage has at most {pct(CRITERIA['fp32_dense_at_most'], 0)} of its masters bitwise unchanged "
                     f"and at most {CRITERIA['fp32_at_most_of_bf16']:g}× its bf16 bitwise sparsity).")
        else:
            bad = [n for n in unchanged32 if not _fp32_dense(st[n])]
            rows = ", ".join(f"{n} {pct(sp(st[n], 0.0, 'fp32'))} in fp32 vs {pct(sp(st[n], 0.0))} in bf16" for n in bad)
            line += (f". Not every stage is dense in fp32 (dense = at most {pct(CRITERIA['fp32_dense_at_most'], 0)} of the "
                     f"masters bitwise unchanged and at most {CRITERIA['fp32_at_most_of_bf16']:g}× the bf16 bitwise "
                     f"sparsity): {rows}; there, part of the sparsity above is weights the optimizer left alone, not "
                     "rounding.")
        out.append(line)
    th = results["theta0"]["accuracy"][c["task"]]["bf16"]
    for lr in sorted(by_lr):
        d = {n: st[n]["accuracy"][c["task"]]["bf16"]["accuracy"] - th["accuracy"] for n in by_lr[lr]}
        out.append(f"- Held-out {c['task']} accuracy (θ0 {pct(th['accuracy'])}, n = {th['n']:,}) after the lr {lr:g} stages: "
                   f"{pts(min(d.values()))} to {pts(max(d.values()))} (two standard errors ≈ "
                   f"{100 * 2 * math.sqrt(2) * se(th['accuracy'], th['n']):.1f} points).")
    sub = results.get("subnetwork") or {}
    for alg, sec in (sub.get("reruns") or {}).items():
        srow = _rows(sec, "subnetwork re-run")
        if not srow:
            continue
        r = srow[0]
        base = "; ".join(f"{b['run']} {pct(ident(b, 1e-5))}" for b in sec["rows"] if b is not r)
        d = _acc_diff(sec, r, c["task"])
        out.append(f"- Re-training only {alg}'s subnetwork ({pct(sec['mask']['density'])} of the parameters; same seed and data "
                   f"order) gives a model whose bf16 parameters equal θ_full's in {pct(ident(r, 1e-5))} of entries at atol "
                   f"1e-5 and {pct(ident(r, 1e-4), 2)} at 1e-4 (paper: 90.5–94.0% and 100%); baselines at 1e-5: {base}."
                   + (f" Held-out {c['task']} accuracy {pct(d[2]['accuracy'])} vs θ_full {pct(d[2]['accuracy'] - d[0])}." if d else ""))
    ov = sub.get("overlap")
    if ov:
        seeds = [x for x in ov["comparisons"] if x["group"] == "seeds" and x["o1"] is not None]
        if seeds:
            out.append("- Subnetworks of different seeds overlap at o1 " + ", ".join(
                f"{pct(x['o1'])} ({x['a']}/{x['b']})" for x in seeds) + " against a density chance of "
                + ", ".join(pct(x["chance_o1"]) for x in seeds) + " and a magnitude-matched chance of "
                + ", ".join(pct(x["magnitude_chance_o1"]) for x in seeds) + " (paper, DPO seeds: 60.5% vs 36.7%).")
    verdicts = {}
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


def render_markdown(results: dict, claims: list[dict], figure_files: Sequence[str]) -> str:
    c = results["config"]
    th = results["theta0"]
    st = results["stages"]
    tim = results["timings"]
    v = results["versions"]
    tasks = list(th["accuracy"])
    md = [f"# rlsubnet demo: RL finetunes small subnetworks? Measured on a {th['parameters']:,}-parameter model",
          ""]
    md.append(
        f"A {c['size']} Llama-style model ({th['parameters']:,} parameters, character-level tokenizer) was pretrained from "
        f"scratch on {' and '.join(tasks)} and saved in bf16 as θ0. From θ0, {len(st)} finetuning stages ran with TRL "
        f"{v['trl']}'s real trainers ({', '.join(sorted({s['trainer'] for s in st.values()}))}), each {c['steps']} optimizer "
        f"steps with fp32 master weights, seed {c['seed']}. Every stage's bf16 checkpoint was compared with θ0 by the "
        f"rlsubnet compare engine. "
        + (f"Then {len(results['subnetwork']['runs'])} more runs for the subnetwork experiments (the paper's Tables 3 and "
           "4): GRPO and DPO re-run from θ0 on their own subnetwork and on a random mask of equal density, and with other "
           "seeds. " if (results.get("subnetwork") or {}).get("runs") else "")
        + "Everything below was measured in this run; the paper's numbers are labelled as such. "
        "One small model, short runs: treat differences of a point or two as noise.")
    md.append("")
    md.append(f"Versions: rlsubnet {v['rlsubnet']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
              f"datasets {v['datasets']}, accelerate {v['accelerate']}; {v['torch_threads']} torch threads.")
    md += ["", "## In short", ""]
    md += summary_lines(results, claims)
    md += ["", "## θ0", ""]
    reached = (f"reached the target at step {th['reached_at_step']}" if th["target_reached"] else
               f"**did not reach the target** within {th['steps_done']} steps: RL results below start from a weaker base")
    md.append(f"{th['settings']}. Pretraining {reached}. Held-out greedy accuracy of the bf16 θ0: "
              + ", ".join(f"{t} {pct(th['accuracy'][t]['bf16']['accuracy'])} (n = {th['accuracy'][t]['bf16']['n']:,})" for t in tasks)
              + ". The held-out problems are never trained on (nor used to stop pretraining: a separate validation split is).")
    s = results["samples"]
    md.append("")
    md.append(f"θ0's own samples ({s['settings']}): sample accuracy {pct(s['sample_accuracy'])}; "
              f"{s['prompts_with_a_correct_sample']:,} prompts with a correct sample (rejection-sampling FT data), "
              f"{s['prompts_with_correct_and_incorrect']:,} with a correct and an incorrect one (DPO pairs).")

    md += ["", "## Results", ""]
    headers = ["stage", "what", "lr", "sparsity bf16 @1e-5", "bf16 @0", "fp32 @1e-5", "fp32 @0", "mean rank"]
    headers += [f"{t} acc (θ0 {pct(th['accuracy'][t]['bf16']['accuracy'])})" for t in tasks]
    headers.append(f"{tasks[0]} acc, fp32 masters")
    rows = []
    for n, x in st.items():
        row = [f"`{n}`", x["description"], f"{x['spec']['learning_rate']:g}", pct(sp(x)), pct(sp(x, 0.0)),
               pct(sp(x, 1e-5, "fp32")), pct(sp(x, 0.0, "fp32")), pct(x["bf16_rank"]["mean_rank_ratio"])]
        row += [pct(x["accuracy"][t]["bf16"]["accuracy"]) if t in x["accuracy"] else "–" for t in tasks]
        row.append(pct(x["accuracy"][tasks[0]]["fp32_master"]["accuracy"]) if tasks[0] in x["accuracy"] else "–")
        rows.append(row)
    md.append(_table(headers, rows))
    md.append("")
    md.append("Sparsity = share of parameters unchanged (|Δ| ≤ atol; atol 0 is bitwise); density = 100% − sparsity. "
              "bf16: the saved bf16 checkpoints, as the paper measured; fp32: the fp32 master weights against θ0 (which "
              "they start from exactly). Mean rank: rank(ΔW) / min(m, n) averaged over 2-D non-norm matrices. "
              "Accuracy: greedy, exact match, on the held-out split, of the bf16 checkpoint (and, last column, of the "
              "fp32 master weights before rounding to bf16).")
    md.append("")
    md.append("Settings per stage:")
    md.append("")
    for n, x in st.items():
        d = x["data"]
        md.append(f"- `{n}`: {x['settings']}; {d['rows']:,} training rows ({d['unique_prompts']:,} distinct prompts, "
                  f"{d['epochs']:.2f} passes over a pool of {d['pool']:,}); optimizer {x['optimizer'].get('class', '?').split('.')[-1]} "
                  f"(weight decay {x['spec']['weight_decay']:g}).")

    md += ["", "## The paper's claims, checked", ""]
    md.append("Verdict criteria: " + "; ".join((
        f"a knob has 'little effect' when sparsity moves by ≤ {CRITERIA['small_effect_points']:g} points",
        f"two sparsities are 'similar' within {CRITERIA['gap_closed_points']:g} points",
        f"'nearly full rank' is ≥ {CRITERIA['full_rank']:.0%}",
        f"layers are 'about equally sparse' when their spread is ≤ {CRITERIA['uniform_layers_points']:g} points",
        f"θ_sub 'reproduces' θ_full when identity at 1e-5 is ≥ {100 * CRITERIA['identity_1e-5']:.1f}% (the paper's lower "
        f"figure), at 1e-4 within {CRITERIA['identity_1e-4_points']:g} points of 100%, and accuracy is not lower by more "
        "than two standard errors",
        f"it 'beats' a baseline by more than {CRITERIA['beats_baseline_points']:g} points of identity at 1e-5",
        f"overlap is 'far above chance' when its reach is ≥ {CRITERIA['above_chance_reach']:.2f} (the paper's Table 4 "
        f"rows: {_paper_reach_range()})",
        f"RFT is 'also sparse' when it keeps ≥ {pct(CRITERIA['rft_sparse_at_least'])} unchanged",
        f"sparsity 'decays monotonically' when no snapshot rises by more than {CRITERIA['monotone_tolerance_points']:g} "
        "points",
        f"the decomposition matches when each share is within {CRITERIA['decomposition_share_points']:g} points and a "
        f"factor {CRITERIA['ever_outside_factor']:g} of the paper's and the ever-updated share outside the final subnetwork within a factor "
        f"{CRITERIA['ever_outside_factor']:g} of {paper.EVER_UPDATED_OUTSIDE_FINAL:g}%",
        f"a run is 'dense in fp32' when ≤ {pct(CRITERIA['fp32_dense_at_most'], 0)} of its masters are bitwise unchanged",
        f"stages 'fall on one curve' of P(changed | |w|) when they differ by ≤ {CRITERIA['one_curve_points']:g} points in "
        f"every bucket of ≥ {CRITERIA['one_curve_min_bucket']:,} weights")) + ".")
    md.append("")
    md.append(_table(["claim", "paper", "ours", "verdict"],
                     [[c_["claim"], c_["paper"], c_["ours"] + f" — {c_['why']}", f"**{c_['verdict']}**"] for c_ in claims]))
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
        trows.append([k, "reused" if t.get("reused") else f"{t['wall_s']:.1f}", "" if t.get("reused") else f"{t['cpu_s']:.1f}",
                      where])
    md.append(_table(["stage", "wall (s)", "cpu (s)", "where"], trows))
    md.append("")
    if "finetuning_phase" in tim:
        ph = tim["finetuning_phase"]
        threads = mach.get("threads_per_stage", 1)
        if jobs > 1:
            md.append(f"The finetuning stages ran up to {jobs} at a time (`--jobs {jobs}`), each in its own worker process "
                      f"with {threads} torch thread{'s' if threads > 1 else ''}: the phase took {ph['wall_s']:.0f} s wall, "
                      "less than the sum of the stages' own wall times, which grow when stages share the CPU. Which process "
                      "runs a stage never changes its numbers (same spec, same thread count: same bits).")
        else:
            md.append(f"The finetuning stages ran one after another in the main process (`--jobs 1`, {threads} torch "
                      f"thread{'s' if threads > 1 else ''}): {ph['wall_s']:.0f} s wall.")
    if "total" in tim:
        md.append("")
        md.append(f"Total wall time of this invocation: {tim['total']['wall_s']:.0f} s (stages marked reused were "
                  f"finished by an earlier run and not recomputed); CPU time {tim['total']['cpu_s']:.0f} s, worker processes "
                  "included.")
    if mach:
        la0, la1 = mach.get("loadavg_start"), mach.get("loadavg_end")
        md.append("")
        md.append(f"Machine: {mach.get('cpu_count')} CPU cores; load average (1, 5, 15 min) "
                  + (f"{la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f} at the start" if la0 else "")
                  + (f", {la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f} at the end" if la1 else "")
                  + " (this run's own processes included): other jobs on the machine lengthen every wall time above.")
    md += ["", "## What this run does not show", ""]
    seed_counts = seeds_per_algorithm(results)
    spread = (("run-to-run spread is measured only for " + " and ".join(
        f"{of.upper()} ({k} seed{'s' if k > 1 else ''})" for of, k in seed_counts.items()) + ", in the subnetwork sections")
        if seed_counts else "run-to-run spread is not measured")
    md += [
        f"- One seed ({c['seed']}) for every finetuning stage; {spread}. Same seed, same machine and thread count: "
        "same numbers.",
        f"- A {th['parameters']:,}-parameter model and {c['steps']}-step runs, against the paper's 7B–671B models and full "
        "training runs. Sparsity depends on lr × steps and on weight magnitudes (see the P(changed | |w|) figure), so our "
        "absolute numbers transfer to no other setting.",
        "- SFT here trains on reference answers of the same task θ0 was pretrained on, not on another model's outputs.",
        f"- The subnetwork re-runs repeat the paper's protocol on {c['steps']}-step runs of a {th['parameters']:,}-parameter "
        "model; the paper's runs are full training runs of 7B-scale models. The overlap 'algorithm' comparison here is GRPO "
        "vs DPO (the paper: DPO vs PRIME), and 'data' is two tasks (two kinds of prompts), not two preference data sets.",
        *commuted_twins_lines(results),
        "", "## Files", "",
        "- `results.json`: every number above and the data of every figure.",
        "- `stages/<name>/`: per stage `stage.json`, the bf16 checkpoint `model/`, `master-fp32.safetensors`, `snapshots/`, "
        "`steps.json`, `data.jsonl` (training rows in order), `log.jsonl` (trainer logs).",
        "- `masks/*.mask.safetensors`: the subnetworks (bf16, atol 1e-5, against θ0) and the random masks, as `rlsubnet mask` "
        "writes them: `rlsubnet overlap masks/grpo.mask.safetensors masks/dpo.mask.safetensors --base "
        "stages/pretrain/model` reproduces a row of the overlap table.",
    ]
    return "\n".join(md) + "\n"


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def prepare_report(results: dict) -> dict[str, tuple[bytes, dict]]:
    """Assess the claims and render every figure (in memory); adds "claims", "criteria" and "figures" to ``results``."""
    figures = render_figures(results)
    results["claims"] = assess(results)
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
    atomic_write_text(out_dir / "results.json", json.dumps(_json_safe(results), indent=1) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(_json_safe(results), results["claims"], list(figures)))
