"""report.md's section "Predicting the subnetwork": each stage's subnetwork predicted from θ0, its plan and a probe
of its first steps, scored against the one it realized, the ``grpo-predicted`` re-run, and the goals, each with
whether this run met it. Every number in it is one of results.json (``prediction``, and ``subnetwork.reruns`` for the re-run)."""

from __future__ import annotations

from rlsubnet.lab.report.records import acc_diff, ident, md_table, pct, pts, rows_of

# The goals the predictor was built for (demo, size small, the RL learning rate, masks at atol 1e-5); they were set
# before any scored run and are not tuned on one.
GOALS = {
    "f1_at_least": 0.85,  # for grpo and dpo, the predicted mask at its expected density
    "above_magnitude_at_least": 0.10,  # over the |w| baseline at equal density
    "below_ceiling_at_most": 0.05,  # under the seed ceiling (another seed's realized mask as the prediction)
    "predicted_share_of_gap_at_least": 0.5,  # grpo-predicted's identity gain over grpo-random, share of grpo-subnet's
}
GOAL_STAGES = ("grpo", "dpo")
EPS = 1e-12  # a figure exactly at a goal's bound meets it, whatever the last bit of a float difference
GOAL_ATOL = 1e-5


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _below(ceiling: float, f1: float) -> str:
    gap = ceiling - f1
    where = f"{gap:.3f} below" if gap >= 0 else f"{-gap:.3f} above"
    return f"{where} the ceiling ({_f(ceiling)})"


def prediction_goals(results: dict) -> list[dict]:
    """Each goal with the figure this run reached and whether it met it (None: not measured in this run)."""
    pred = results.get("prediction") or {}
    rows = pred.get("stages") or {}
    name = pred.get("settings", {}).get("predictor", "probe")
    out = []
    for stage in GOAL_STAGES:
        row = rows.get(stage)
        s = (row or {}).get("predictors", {}).get(name)
        f1 = s["f1"] if s else None
        mag = s["baselines"]["magnitude"]["f1"] if s else None
        ceiling = ((row or {}).get("ceiling") or {}).get("f1")
        out += [
            {
                "goal": f"`{stage}`: F1 ≥ {GOALS['f1_at_least']:.2f}",
                "reached": f"F1 {_f(f1)}",
                "met": None if f1 is None else f1 >= GOALS["f1_at_least"] - EPS,
            },
            {
                "goal": f"`{stage}`: F1 at least {GOALS['above_magnitude_at_least']:.2f} above the \\|w\\| baseline",
                "reached": "–" if f1 is None or mag is None else f"{f1 - mag:+.3f} (\\|w\\| F1 {_f(mag)})",
                "met": None if f1 is None or mag is None else f1 - mag >= GOALS["above_magnitude_at_least"] - EPS,
            },
            {
                "goal": f"`{stage}`: F1 within {GOALS['below_ceiling_at_most']:.2f} of the seed ceiling",
                "reached": "–" if f1 is None or ceiling is None else _below(ceiling, f1),
                "met": None if f1 is None or ceiling is None else ceiling - f1 <= GOALS["below_ceiling_at_most"] + EPS,
            },
        ]
    sec = ((results.get("subnetwork") or {}).get("reruns") or {}).get("grpo")
    p, r, s_ = (rows_of(sec, role) if sec else [] for role in _ROLES)
    if p and r and s_:
        ip, ir, is_ = (ident(x[0], GOAL_ATOL) for x in (p, r, s_))
        share = (ip - ir) / (is_ - ir) if is_ is not None and ir is not None and ip is not None and is_ > ir else None
        out.append(
            {
                "goal": "`grpo-predicted` closer to θ_full than `grpo-random` by at least half the gap between "
                "`grpo-random` and `grpo-subnet` (identity at atol 1e-5)",
                "reached": f"{pct(ip)} vs {pct(ir)} and {pct(is_)}: "
                + ("–" if share is None else f"{share:.2f} of the gap"),
                "met": None if share is None else share >= GOALS["predicted_share_of_gap_at_least"] - EPS,
            }
        )
    else:
        out.append({"goal": "`grpo-predicted` against `grpo-random` and `grpo-subnet`", "reached": "–", "met": None})
    return out


_ROLES = ("predicted-mask re-run", "random-mask re-run", "subnetwork re-run")


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**not met**")


def prediction_summary_lines(results: dict) -> list[str]:
    """The summary's line on the predictions."""
    pred = results.get("prediction") or {}
    rows = pred.get("stages") or {}
    name = pred.get("settings", {}).get("predictor", "probe")
    have = [n for n in GOAL_STAGES if n in rows]
    if not have:
        return []
    parts = []
    for n in have:
        s = rows[n]["predictors"][name]
        ceiling = (rows[n].get("ceiling") or {}).get("f1")
        parts.append(f"{n} F1 {_f(s['f1'])} (|w| {_f(s['baselines']['magnitude']['f1'])}, seed ceiling {_f(ceiling)})")
    goals = prediction_goals(results)
    met = sum(1 for g in goals if g["met"])
    measured = sum(1 for g in goals if g["met"] is not None)
    k = rows[have[0]]["probe_steps"]
    return [
        f"- Subnetworks predicted from θ0, the plan and the first {k} of {rows[have[0]]['steps']} steps: "
        f"{', '.join(parts)}; {met} of the {measured} prediction goals measured were met"
        + (f" ({len(goals) - measured} not measured)." if measured < len(goals) else ".")
    ]


def prediction_markdown(results: dict) -> list[str]:
    """The section: the per-stage table, the predictors on GRPO and DPO, the ``grpo-predicted`` re-run, the goals."""
    pred = results.get("prediction")
    if not pred:
        return []
    rows = pred["stages"]
    name = pred["settings"]["predictor"]
    tsk = results["config"]["task"]
    md = ["", "## Predicting the subnetwork", ""]
    md.append(
        f"Each finetuning stage's subnetwork predicted from what is known after a short probe: θ0, the stage's plan "
        f"(optimizer, learning "
        f"rate, steps; bf16 checkpoints, atol {str(pred['settings']['mask_atol']).replace('e-05', 'e-5')}) and a probe of the run's first K steps "
        f"(10% of its T steps, at least 2), recorded on the way: the same statistics, bit for bit, as a K-step probe "
        f"run before it. Entries the probe has already changed count as changed (the column 'changed by step K' "
        f"gives their share of the realized mask: hits that no predictor from θ0 alone can get). "
        f"The `{name}` predictor (no fitted parameter; chosen on runs this report does not score) gives each entry "
        f"the probability that the run changes it; the predicted mask keeps the most probable entries, as many as the "
        f"expected density says. It is scored against the mask the run realized: precision, recall, F1, F1 when "
        f"cut at the realized density instead, and average precision (AP) of the probabilities. Baselines at the "
        f"same density: the entries with the smallest \\|θ0\\| (\\|w\\|) and a random mask (its F1 in expectation). The seed "
        f"ceiling is another seed's realized mask used as the prediction: the most a predictor that does not see the "
        f'run\'s own samples can expect. Definitions: docs/concepts.md, "Predicting the subnetwork".'
    )
    md.append("")
    headers = [
        "stage",
        "what",
        "K / T",
        "density realized",
        "predicted",
        "precision",
        "recall",
        "F1",
        "F1 @ realized density",
        "AP",
        "changed by step K",
        "\\|w\\| F1",
        "random F1",
        "seed ceiling F1",
    ]
    table = []
    for n, row in rows.items():
        s = row["predictors"][name]
        what = f"{row['algorithm'].upper()} on {row['task']}, lr {row['learning_rate']:g}"
        if row["optimizer"] != "adamw":
            what += f", {row['optimizer']}"
        table.append(
            [
                f"`{n}`",
                what,
                f"{row['probe_steps']} / {row['steps']}",
                pct(s["density_realized"]),
                pct(s["density_predicted"]),
                _f(s["precision"]),
                _f(s["recall"]),
                _f(s["f1"]),
                _f(s["at_realized_density"]["f1"]),
                _f(s["average_precision"]),
                pct((row.get("changed_by_step_k") or {}).get("share_of_realized")),
                _f(s["baselines"]["magnitude"]["f1"]),
                _f(s["baselines"]["random"]["f1"]),
                _f((row.get("ceiling") or {}).get("f1")),
            ]
        )
    if table:
        md.append(md_table(headers, table))
    for n, why in (pred.get("skipped") or {}).items():
        md.append(f"\n`{n}` is not scored: {why}.")
    detailed = [n for n in GOAL_STAGES if n in rows and len(rows[n]["predictors"]) > 1]
    if detailed:
        md += ["", "Every predictor on the goal stages (each at its own expected density):", ""]
        t2 = []
        for n in detailed:
            row = rows[n]
            for p_name, s in row["predictors"].items():
                how = {
                    "budget": "θ0 and the plan only",
                    "probe": "θ0, the plan, the probe",
                    "calibrated": f"logistic rule fitted on `{(row.get('calibration') or {}).get('run')}`",
                }.get(p_name, p_name)
                t2.append(
                    [
                        f"`{n}`",
                        p_name,
                        how,
                        pct(s["density_predicted"]),
                        _f(s["f1"]),
                        _f(s["at_realized_density"]["f1"]),
                        _f(s["average_precision"]),
                        _f(s["baselines"]["magnitude"]["f1"]),
                    ]
                )
        md.append(
            md_table(
                ["stage", "predictor", "reads", "density predicted", "F1", "F1 @ realized", "AP", "\\|w\\| F1"], t2
            )
        )
        for n in detailed:
            why = (rows[n].get("calibration") or {}).get("skipped")
            if why:
                md.append(f"\n`{n}`: the calibrated predictor could not be fitted ({why}).")
    sec = ((results.get("subnetwork") or {}).get("reruns") or {}).get("grpo")
    if sec and rows_of(sec, "predicted-mask re-run"):
        md += [
            "",
            "Training only the predicted subnetwork: `grpo-predicted` re-runs `grpo` from θ0 (same spec, seed and "
            "data order) on the mask predicted from θ0, its plan and its first K steps, beside the re-runs on `grpo`'s own subnetwork "
            "and on a random mask of its density:",
            "",
        ]
        t3 = []
        for role in ("subnetwork re-run", "predicted-mask re-run", "random-mask re-run"):
            for r in rows_of(sec, role):
                d = acc_diff(sec, r, tsk)
                t3.append(
                    [
                        f"`{r['run']}`",
                        pct((r.get("trained_mask") or {}).get("density")),
                        pct(ident(r, 0.0)),
                        pct(ident(r, 1e-5)),
                        pct(ident(r, 1e-4), 2),
                        pct(r["accuracy"][tsk]["bf16"]["accuracy"]),
                        f"{pts(d[0])} (± {100 * d[1]:.1f})" if d else "–",
                    ]
                )
        md.append(
            md_table(
                ["run", "mask density", "identity with θ_full @0", "@1e-5", "@1e-4", f"{tsk} acc", "Δ acc vs θ_full"],
                t3,
            )
        )
    md += ["", "The goals, set before any scored run (size small, RL learning rate, masks at atol 1e-5):", ""]
    goals = prediction_goals(results)
    md.append(md_table(["goal", "this run", "verdict"], [[g["goal"], g["reached"], _verdict(g["met"])] for g in goals]))
    if any(g["met"] is False for g in goals):
        md += [
            "",
            "A goal not met is reported as such; nothing was tuned on this run to close the gap. What limits the "
            "prediction is the probe's length: the goals allow 10% of the steps, and the entries whose fate the "
            'later steps\' samples decide stay uncertain (docs/concepts.md, "How the predictors were chosen", '
            "measures longer probes on runs the demo does not score).",
        ]
    return md
