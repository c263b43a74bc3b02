"""The criteria behind every verdict of the report, stated once: a reader may disagree with a threshold but never
has to guess it. They are stored in results.json (``criteria``) next to the verdicts they decided."""

from __future__ import annotations

from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.report.records import pct, sp, trained

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
    # the optimizer as a cause: SGD updates "far fewer" parameters when its bf16 density (atol 1e-5) is at most this
    # fraction of AdamW's for the same GRPO run; "equal gains" when its held-out gain over θ0 is not lower than
    # AdamW's by more than two standard errors of the difference
    "far_fewer_at_most": 0.1,
    # where the update points, RL against SFT at one learning rate: RL's principal-subspace rotation (mean of the
    # left and right largest angles) and spectral drift are "small, and larger under SFT" when at most this fraction
    # of SFT's; RL's update is "off the principal directions" when its share of ‖Δ‖² inside W0's top-k subspaces is at
    # most this multiple of a random update's (k²/(m·n)) and SFT's share is larger than RL's by the fraction above
    "spectral_smaller_at_most": 0.5,
    "off_principal_at_most": 1.0,
    # "effectively low rank": 90% of ‖Δ‖² in at most this share of min(m, n) singular directions (mean over matrices);
    # "full rank" is the numerical rank's share of min(m, n), at least CRITERIA["full_rank"]
    "energy_rank_90_at_most": 0.25,
}


def dense_in_fp32(stage: dict) -> bool:
    """At most CRITERIA["fp32_dense_at_most"] of the stage's fp32 masters are bitwise equal to θ0."""
    return sp(stage, 0.0, "fp32") <= CRITERIA["fp32_dense_at_most"]


def fp32_explains_sparsity(results: dict) -> bool:
    """Whether every trained stage is dense in fp32 (bitwise) and well below its bf16 bitwise sparsity there."""
    st = [s for s in results["stages"].values() if trained(s)]
    return bool(st) and all(fp32_dense(s) for s in st)


def fp32_dense(s: dict) -> bool:
    return dense_in_fp32(s) and sp(s, 0.0, "fp32") <= CRITERIA["fp32_at_most_of_bf16"] * sp(s, 0.0)


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


def criteria_sentence(results: dict) -> str:
    """The criteria above in one paragraph of the report, with the reach of the paper's own Table 4 rows for scale
    (computed from the paper's figures in the measurement step: ``subnetwork.paper.table4``)."""
    paper_rows = ((results.get("subnetwork") or {}).get("paper") or {}).get("table4") or []
    paper_reach = [r["reach"] for r in paper_rows if r.get("reach") is not None]
    return (
        "Verdict criteria: "
        + "; ".join(
            (
                f"a knob has 'little effect' when sparsity moves by ≤ {CRITERIA['small_effect_points']:g} points",
                f"two sparsities are 'similar' within {CRITERIA['gap_closed_points']:g} points",
                f"'nearly full rank' is ≥ {CRITERIA['full_rank']:.0%}",
                f"layers are 'about equally sparse' when their spread is ≤ {CRITERIA['uniform_layers_points']:g} points",
                f"θ_sub 'reproduces' θ_full when identity at 1e-5 is ≥ {100 * CRITERIA['identity_1e-5']:.1f}% (the paper's lower "
                f"figure), at 1e-4 within {CRITERIA['identity_1e-4_points']:g} points of 100%, and accuracy is not lower by more "
                "than two standard errors",
                f"it 'beats' a baseline by more than {CRITERIA['beats_baseline_points']:g} points of identity at 1e-5",
                f"overlap is 'far above chance' when its reach is ≥ {CRITERIA['above_chance_reach']:.2f}"
                + (
                    f" (the paper's Table 4 rows: {min(paper_reach):.2f}–{max(paper_reach):.2f})" if paper_reach else ""
                ),
                f"RFT is 'also sparse' when it keeps ≥ {pct(CRITERIA['rft_sparse_at_least'])} unchanged",
                f"sparsity 'decays monotonically' when no snapshot rises by more than {CRITERIA['monotone_tolerance_points']:g} "
                "points",
                f"the decomposition matches when each share is within {CRITERIA['decomposition_share_points']:g} points and a "
                f"factor {CRITERIA['ever_outside_factor']:g} of the paper's and the ever-updated share outside the final subnetwork within a factor "
                f"{CRITERIA['ever_outside_factor']:g} of {paper.EVER_UPDATED_OUTSIDE_FINAL:g}%",
                f"a run is 'dense in fp32' when ≤ {pct(CRITERIA['fp32_dense_at_most'], 0)} of its masters are bitwise unchanged",
                f"stages 'fall on one curve' of P(changed | |w|) when they differ by ≤ {CRITERIA['one_curve_points']:g} points in "
                f"every bucket of ≥ {CRITERIA['one_curve_min_bucket']:,} weights",
            )
        )
        + "."
    )
