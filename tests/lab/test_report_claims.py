"""The demo report's verdicts and sentences follow the measured numbers (synthetic results dicts; no training).

Each test builds a small results dict shaped like ``rlsubnet.lab.pipeline``'s, checks what the report says about it,
then changes one measured number and checks that the verdict or sentence changes with it.
"""

from __future__ import annotations

import copy

import pytest

from rlsubnet.lab.measure import commuted_twins
from rlsubnet.lab.report import claims, criteria, figures, markdown, records, subnetwork_claims

TASK = "add"
RL_LR, SFT_LR, STEPS = 1e-6, 1e-5, 100


def _buckets(p_small: float, p_mid: float, p_big: float = 0.0) -> list[dict]:
    """|w| buckets (lo, hi, numel, P(changed) at atol 0 and 1e-5); the last one is too small to count for 'one curve'."""
    rows = [(0.001, 0.002, 5000, p_small), (0.01, 0.02, 20000, p_mid), (0.0625, 0.125, 10000, p_big), (0.5, 1.0, 500, 0.0)]
    return [{"lo": lo, "hi": hi, "numel": n, "p_changed": {"0.0": p, "1e-05": p}} for lo, hi, n, p in rows]


def _by_atol(sparsity: float, numel: int = 1000) -> list[dict]:
    return [{"atol": a, "numel": numel, "changed": int(round((1 - sparsity) * numel)), "sparsity": sparsity,
             "density": 1 - sparsity} for a in (0.0, 1e-5, 1e-4)]


def _stage(name, algorithm, lr, sparsity, *, task=TASK, data="prompts", fp32=0.0, acc=0.65, p_mid=0.5, seed=0):
    numel = 35500
    return {
        "spec": {"name": name, "algorithm": algorithm, "task": task, "data": data, "learning_rate": lr, "steps": STEPS,
                 "batch_size": 32, "seed": seed, "data_seed": 0, "weight_decay": 0.0, "beta": 0.1},
        "settings": f"{algorithm} lr {lr:g}", "description": name, "trainer": "GRPOTrainer",
        "optimizer": {"class": "torch.optim.AdamW"},
        "data": {"rows": 3200, "unique_prompts": 3200, "epochs": 0.5, "pool": 6166 if data == "own-correct" else 7500},
        "accuracy": {task: {"bf16": {"accuracy": acc, "n": 2000}, "fp32_master": {"accuracy": acc, "n": 2000}}},
        "sparsity": {"bf16": {"0.0": sparsity - 0.005, "1e-05": sparsity, "0.0001": sparsity + 0.01},
                     "fp32": {"0.0": fp32, "1e-05": fp32 + 0.01}},
        "fp32": {"global": [{"atol": 0.0, "numel": numel, "changed": int(round((1 - fp32) * numel)), "sparsity": fp32}]},
        "bf16_rank": {"mean_rank_ratio": 0.997},
        "bf16": {"layers": [{"layer": i, "by_atol": _by_atol(sparsity + 0.01 * i)} for i in range(3)],
                 "modules": [{"module": "norm", "by_atol": _by_atol(1.0)}]},
        "matrices": [{"name": "q", "sparsity": sparsity}, {"name": "k", "sparsity": sparsity + 0.05}],
        "snapshot_every": 10,
        "sparsity_vs_step": [{"step": s, "sparsity": {"1e-05": v, "0.0": v}}
                             for s, v in ((0, 1.0), (10, 0.99), (50, 0.85), (100, sparsity))],
        "decomposition_snapshots": [_dec(0.718, 0.005, 0.277)],
        "decomposition_every_step": [_dec(0.718, 0.006, 0.276)],
        "magnitude_bf16": {"buckets": _buckets(0.9, p_mid)},
        "step_to_step": [],
    }


def _dec(never, returned, final, ever_share=None):
    ever = returned + final
    return {"atol": 1e-5, "never_share": never, "returned_share": returned, "final_share": final,
            "returned_share_of_ever": returned / ever if ever_share is None else ever_share}


def _identity(i5, i4=0.9995):
    return [{"atol": 0.0, "identity": i5 - 0.02, "identity_in_mask": 0.9, "numel": 1000, "identical": 900},
            {"atol": 1e-5, "identity": i5, "identity_in_mask": 0.95, "numel": 1000, "identical": int(i5 * 1000)},
            {"atol": 1e-4, "identity": i4, "identity_in_mask": 0.99, "numel": 1000, "identical": int(i4 * 1000)}]


def _cmp(group, a, b, ratio, what=""):
    return {"group": group, "a": a, "b": b, "what": what or f"{a} vs {b}", "o1": 0.85, "o2": 0.85, "jaccard": 0.7,
            "chance_o1": 0.28, "chance_o2": 0.28, "magnitude_chance_o1": 0.85 / ratio, "magnitude_chance_o2": 0.6,
            "density_a": 0.28, "density_b": 0.28, "reach": 0.8, "o1_over_magnitude_chance": ratio,
            "magnitude_explains_share_of_excess": 0.57}


def _run(role, of, algorithm, seed, lr=RL_LR):
    return {"role": role, "of": of,
            "spec": {"algorithm": algorithm, "task": TASK, "learning_rate": lr, "steps": STEPS, "batch_size": 32,
                     "seed": seed},
            "sparsity": {"bf16": {"1e-05": 0.72}}, "accuracy": {TASK: {"bf16": {"accuracy": 0.655, "n": 2000}}}}


def _rows(alg):
    rows = [{"run": f"{alg}-subnet", "role": "subnetwork re-run", "identity": _identity(0.988),
             "identity_fp32_masters": _identity(0.3), "accuracy": {TASK: {"bf16": {"accuracy": 0.655, "n": 2000}}}},
            {"run": f"{alg}-random", "role": "random-mask re-run", "identity": _identity(0.797),
             "identity_fp32_masters": _identity(0.25), "accuracy": {TASK: {"bf16": {"accuracy": 0.648, "n": 2000}}}},
            {"run": f"{alg}-seed1", "role": "full run, another seed", "identity": _identity(0.894),
             "identity_fp32_masters": _identity(0.35), "accuracy": {TASK: {"bf16": {"accuracy": 0.65, "n": 2000}}}}]
    return rows


@pytest.fixture
def results():
    st = {
        "grpo": _stage("grpo", "grpo", RL_LR, 0.723, acc=0.656),
        "dpo": _stage("dpo", "dpo", RL_LR, 0.720, data="own-pairs", acc=0.654),
        "sft": _stage("sft", "sft", SFT_LR, 0.194, data="gold", acc=0.78, p_mid=0.86),
        "sft-matched": _stage("sft-matched", "sft", RL_LR, 0.717, data="gold", acc=0.655),
        "rft": _stage("rft", "sft", SFT_LR, 0.189, data="own-correct", acc=0.79, p_mid=0.87),
        "grpo-sftlr": _stage("grpo-sftlr", "grpo", SFT_LR, 0.197, acc=0.775, p_mid=0.865),
        "grpo-task-sub": _stage("grpo-task-sub", "grpo", RL_LR, 0.692, task="sub", acc=0.64),
    }
    runs = {"grpo-seed1": _run("full run, another seed", "grpo", "grpo", 1),
            "grpo-seed2": _run("full run, another seed", "grpo", "grpo", 2),
            "dpo-seed1": _run("full run, another seed", "dpo", "dpo", 1),
            "grpo-subnet": _run("subnetwork re-run", "grpo", "grpo", 0),
            "grpo-random": _run("random-mask re-run", "grpo", "grpo", 0),
            "dpo-subnet": _run("subnetwork re-run", "dpo", "dpo", 0),
            "dpo-random": _run("random-mask re-run", "dpo", "dpo", 0)}
    labels = ["grpo", "grpo-seed1", "grpo-task-sub", "dpo", "sft-matched", "sft", "random (grpo's density)"]
    comps = [_cmp("seeds", "grpo", "grpo-seed1", 1.41), _cmp("data", "grpo", "grpo-task-sub", 1.02),
             _cmp("algorithm", "grpo", "dpo", 1.39), _cmp("algorithm", "grpo", "sft-matched", 1.35),
             _cmp("algorithm", "grpo", "sft", 1.03), _cmp("control", "grpo", "random (grpo's density)", 1.02)]
    reruns = {alg: {"full": alg, "mask": {"density": 0.277, "changed": 277, "numel": 1000},
                    "full_accuracy": {TASK: {"bf16": {"accuracy": st[alg]["accuracy"][TASK]["bf16"]["accuracy"],
                                                      "n": 2000}}},
                    "rows": _rows(alg)} for alg in ("grpo", "dpo")}
    return {
        "config": {"size": "small", "task": TASK, "second_task": "sub", "seed": 0, "steps": STEPS, "batch_size": 32,
                   "rl_lr": RL_LR, "sft_lr": SFT_LR, "snapshot_every": 10, "clip": 1.0},
        "theta0": {"parameters": 1053312, "settings": "SFT from scratch", "steps_done": 900, "target_reached": True,
                   "reached_at_step": 900,
                   "spec": {"target_accuracy": 0.6, "max_steps": 2000},
                   "curve": [{"step": 450, "validation_accuracy": {"add": 0.3, "sub": 0.4}},
                             {"step": 900, "validation_accuracy": {"add": 0.63, "sub": 0.61}}],
                   "accuracy": {TASK: {"bf16": {"accuracy": 0.6415, "n": 2000}}}},
        "stages": st,
        "samples": {"settings": "4 samples", "sample_accuracy": 0.47, "prompts_with_a_correct_sample": 6166,
                    "prompts_with_correct_and_incorrect": 5294},
        "subnetwork": {"runs": runs, "reruns": reruns, "skipped": {},
                       "overlap": {"labels": labels, "comparisons": comps,
                                   "settings": {"masks": [{"kind": "changed"}] * (len(labels) - 1) + [{"kind": "random"}]}}},
        "versions": {k: "0" for k in ("rlsubnet", "torch", "transformers", "trl", "datasets", "accelerate")}
                    | {"torch_threads": 1},
        "timings": {}, "machine": {},
    }


def claim(results, cid):
    return next(c for c in claims.assess(results) if c["id"] == cid)


# 1. decomposition


def test_decomposition_checks_shares_and_the_ever_updated_share(results):
    c = claim(results, "decomposition")
    assert c["verdict"] == "partly agrees"  # never and final match; returned (0.6% vs 8%) and 2.1% of the ever-updated do not
    assert "returned 0.6% vs 8% (not within" in c["why"]
    assert "28.6%" in c["why"] and "separately" in c["why"] and "rarely" in c["why"]
    for s in results["stages"]["grpo"]["decomposition_every_step"]:
        s.update(_dec(0.72, 0.08, 0.20, ever_share=0.085))
    c = claim(results, "decomposition")
    assert c["verdict"] == "agrees" and "rarely" not in c["why"]
    for s in results["stages"]["grpo"]["decomposition_every_step"]:
        s.update(_dec(0.30, 0.30, 0.40))  # many return: 43% of the ever-updated
    c = claim(results, "decomposition")
    assert c["verdict"] == "differs" and "rarely" not in c["why"] and "More of the ever-updated" in c["why"]


# 2. precision


def test_precision_can_differ_and_measures_one_curve(results):
    c = claim(results, "precision")
    assert c["verdict"] == "agrees"
    assert "fall on one curve" in c["why"] and "largest gap between two of them in one |w| bucket is 1.0 points" in c["why"]
    g = results["stages"]["grpo"]
    g["sparsity"]["fp32"]["0.0"] = 0.5  # half the masters never moved
    g["magnitude_bf16"]["buckets"] = _buckets(0.9, 0.2, p_big=0.5)  # weights above 512·lr·T change; off dpo's curve
    c = claim(results, "precision")
    assert c["verdict"] == "differs"
    assert "do not fall on one curve" in c["why"] and "is 50.0 points (lr 1e-06" in c["why"]
    assert "the stages fall on one curve per learning rate" not in c["why"]


def test_one_curve_ignores_small_buckets(results, monkeypatch):
    for n in ("dpo", "sft-matched"):
        results["stages"][n]["magnitude_bf16"]["buckets"][-1]["p_changed"]["0.0"] = 1.0  # 500 weights: not counted
    gap, (lr, _, _) = criteria.one_curve_gap(results)
    assert gap == pytest.approx(0.01) and lr == SFT_LR  # sft / rft / grpo-sftlr at 86–87% in the middle bucket
    monkeypatch.setitem(criteria.CRITERIA, "one_curve_min_bucket", 100)
    gap, (lr, bucket, names) = criteria.one_curve_gap(results)
    assert gap == pytest.approx(1.0) and lr == RL_LR and bucket["lo"] == 0.5 and "grpo-task-sub" not in names


# 3. norms


def test_norm_sentence_follows_lr_times_steps(results):
    c = claim(results, "uniform-layers")
    assert "lr × steps = 0.0001 is below that" in c["why"] and "far beyond" not in c["why"]
    results["stages"]["grpo"]["spec"]["steps"] = 10000  # lr × steps = 0.01 > 2^-8
    c = claim(results, "uniform-layers")
    assert "lr × steps = 0.01 reaches half a bf16 step" in c["why"] and "is below that" not in c["why"]


# 4. summary, fp32 sentence


def test_summary_fp32_sentence_needs_dense_fp32(results):
    line = next(x for x in markdown.summary_lines(results, []) if "Compared in fp32" in x)
    assert "what rounding to bf16 lets through" in line
    results["stages"]["sft-matched"]["sparsity"]["fp32"]["0.0"] = 0.3
    results["stages"]["sft-matched"]["fp32"]["global"][0].update(sparsity=0.3, changed=int(0.7 * 35500))
    line = next(x for x in markdown.summary_lines(results, []) if "Compared in fp32" in x)
    assert "what rounding to bf16 lets through" not in line and "sft-matched 30.0% in fp32" in line


# 5. overlap conclusion


def test_overlap_conclusion_needs_both_conditions(results):
    conclusion = "follows the task data, not the RL algorithm"
    assert any(conclusion in x for x in subnetwork_claims.subnetwork_differences(results))
    r = copy.deepcopy(results)
    next(c for c in r["subnetwork"]["overlap"]["comparisons"] if c["group"] == "data")["o1_over_magnitude_chance"] = 1.5
    lines = subnetwork_claims.subnetwork_differences(r)
    assert not any(conclusion in x for x in lines)
    assert any("the two-task ratio is not below every same-task one" in x for x in lines)
    r = copy.deepcopy(results)
    next(c for c in r["subnetwork"]["overlap"]["comparisons"] if c["b"] == "sft-matched")["o1_over_magnitude_chance"] = 1.1
    lines = subnetwork_claims.subnetwork_differences(r)
    assert not any(conclusion in x for x in lines)
    assert any("SFT-vs-GRPO and GRPO-vs-DPO differ by more than 0.10×" in x for x in lines)


# 6. "barely moves accuracy"


def test_barely_moves_accuracy_needs_a_small_gain(results):
    assert any("barely moves accuracy" in x for x in subnetwork_claims.subnetwork_differences(results))
    sec = results["subnetwork"]["reruns"]["grpo"]
    sec["full_accuracy"][TASK]["bf16"]["accuracy"] = 0.75  # +10.9 points over θ0
    for row in sec["rows"]:
        row["accuracy"][TASK]["bf16"]["accuracy"] = 0.75
    lines = [x for x in subnetwork_claims.subnetwork_differences(results) if x.startswith("- GRPO: accuracy does not tell")]
    assert lines and "barely moves accuracy" not in lines[0] and "more than the noise" in lines[0]


# 7. RFT


def test_rft_states_the_confound_and_its_criterion(results):
    c = claim(results, "in-distribution")
    assert c["verdict"] == "differs"
    assert "every rft row is the sft row for its prompt" in c["why"] and "which prompts it keeps" in c["why"]
    assert "at least 68.5% unchanged" in c["why"] and criteria.CRITERIA["rft_sparse_at_least"] == pytest.approx(0.685)
    results["stages"]["rft"]["sparsity"]["bf16"]["1e-05"] = 0.5  # sparser than sft by 30 points, below 68.5%
    assert claim(results, "in-distribution")["verdict"] == "partly agrees"
    results["stages"]["rft"]["sparsity"]["bf16"]["1e-05"] = 0.7
    assert claim(results, "in-distribution")["verdict"] == "agrees"


# 8. lr confound pairs


def test_lr_confound_pairs_only_the_same_task(results):
    c = claim(results, "lr-confound")
    assert "grpo-task-sub" not in c["ours"] and "grpo-task-sub" not in c["why"]
    assert "grpo − sft-matched" in c["why"] and "grpo-sftlr − sft" in c["why"]


# 9. decay tolerance


def test_decay_tolerance_is_stated_and_used(results):
    curve = results["stages"]["grpo"]["sparsity_vs_step"]
    curve[2]["sparsity"]["1e-05"] = curve[1]["sparsity"]["1e-05"] + 0.0015  # a rise of 0.15 points
    c = claim(results, "decay")
    assert "it decays monotonically" in c["why"] and "more than 0.2 points" in c["why"]
    assert criteria.CRITERIA["monotone_tolerance_points"] == 0.2
    curve[2]["sparsity"]["1e-05"] = curve[1]["sparsity"]["1e-05"] + 0.003
    assert "it does not decay monotonically" in claim(results, "decay")["why"]


# 10. SFT below the paper's range


def test_sft_dense_says_below_or_above(results):
    assert "above its top" in claim(results, "sft-dense")["why"]
    results["stages"]["sft"]["sparsity"]["bf16"]["1e-05"] = 0.02
    why = claim(results, "sft-dense")["why"]
    assert "4.0 points below its bottom" in why and "above its top" not in why and "-" not in why.split("points")[0]


# 11. figure settings


def test_figure_settings_list_every_lr_and_dtype(results):
    labels = results["subnetwork"]["overlap"]["labels"]
    line = records.sub_settings(results, labels)
    assert "lr 1e-06, 1e-05" in line and "bf16" in line and "size small" in line
    pytest.importorskip("matplotlib")
    fig = figures._fig_pretrain(results)
    title = fig.axes[0].get_title()
    assert "size small" in title and "bf16" in title and "fp32" in title


# 12. seed counts


def test_seed_counts_come_from_the_runs(results):
    md = markdown.render_markdown(results, claims.assess(results), [])
    assert "GRPO (3 seeds) and DPO (2 seeds)" in md
    del results["subnetwork"]["runs"]["dpo-seed1"], results["subnetwork"]["runs"]["grpo-seed2"]
    for sec in results["subnetwork"]["reruns"].values():
        sec["rows"] = [r for r in sec["rows"] if r["run"] not in ("dpo-seed1", "grpo-seed2")]
    md = markdown.render_markdown(results, claims.assess(results), [])
    assert "measured only for GRPO (2 seeds), in the subnetwork" in md and "DPO (2 seeds)" not in md


# 13. target not reached


def test_target_not_reached_gives_a_warning(results):
    assert not any(c["id"] == "pretrain-target" for c in claims.assess(results))
    results["theta0"].update(target_reached=False, reached_at_step=None, steps_done=2000)
    c = claim(results, "pretrain-target")
    assert c["verdict"] == "warning" and "2000 of at most 2000 steps" in c["ours"] and "add 63.0%" in c["ours"]


def test_commuted_twins_of_heldout_problems_are_counted():
    """Measured from the task splits in the measurement step; the report only states the stored counts."""
    from rlsubnet.lab.tasks import get_task

    add = get_task("add")
    train = {(p.prompt[:-1].split("+")[0], p.prompt[:-1].split("+")[1]) for p in add.split("train")}
    held = [tuple(p.prompt[:-1].split("+")) for p in add.split("heldout")]
    twins = sum(1 for a, b in held if a != b and (b, a) in train)
    n = sum(1 for a, b in held if a != b)
    measured = commuted_twins(["add", "sub"])
    assert measured == {"add": {"heldout_asymmetric": n, "commuted_twin_in_train": twins}} and 0 < twins < n
    (line,) = markdown.commuted_twins_lines({"commuted_twins": measured})
    assert f"for {twins:,} of the {n:,} held-out problems" in line
    assert commuted_twins(["sub"]) == {} and markdown.commuted_twins_lines({"commuted_twins": {}}) == []


def test_criteria_state_the_reach_of_the_papers_rows_as_stored(results):
    assert "the paper's Table 4 rows" not in criteria.criteria_sentence(results)  # not measured: not stated
    results["subnetwork"]["paper"] = {"table4": [{"reach": 0.38}, {"reach": 0.48}, {"reach": 0.41}]}
    assert "reach is ≥ 0.25 (the paper's Table 4 rows: 0.38–0.48)" in criteria.criteria_sentence(results)


# later work: where the update points, and the optimizer as a cause


def _spectral(angle, drift, pe, nr=1.0, er90=0.1):
    overall = {"principal_angle_left": angle, "principal_angle_right": angle, "spectral_drift": drift,
               "principal_energy_over_chance": pe, "numerical_rank_ratio": nr, "energy_rank_90_ratio": er90,
               "energy_rank_99_ratio": er90 * 2, "effective_rank_ratio": er90 * 2, "stable_rank": 3.0,
               "principal_energy_left": 0.2}
    modules = [{"module": "q", "principal_energy": pe * 0.004, "principal_energy_chance": 0.004,
                "principal_angle_left": angle, "principal_angle_right": angle}]
    return {"top_k": 8, "overall": overall, "modules": modules, "layers": [], "matrices": []}


@pytest.fixture
def spectral_results(results):
    st = results["stages"]
    st["grpo"]["spectral"] = _spectral(0.01, 1e-6, 0.8)
    st["sft-matched"]["spectral"] = _spectral(0.05, 5e-6, 3.0)
    st["grpo-sftlr"]["spectral"] = _spectral(0.2, 2e-5, 1.5)
    st["sft"]["spectral"] = _spectral(0.3, 3e-5, 2.0)
    st["dpo"]["spectral"] = _spectral(0.01, 1e-6, 0.8)
    for n in ("grpo", "grpo-sftlr", "sft", "sft-matched", "dpo"):
        st[n]["spec"].update(beta=0.0, max_grad_norm=1.0)
    results["spectral_reference"] = {"random_delta": {"overall": {**_spectral(0, 0, 1.0, 1.0, 0.6)["overall"]}}}
    return results


def _later(results, cid):
    from rlsubnet.lab.report.spectral_claims import assess_optimizer, assess_spectral

    return next(c for c in assess_optimizer(results) + assess_spectral(results) if c["id"] == cid)


def test_path_not_taken_verdicts_follow_the_pairs_at_each_learning_rate(spectral_results):
    r = spectral_results
    # at the RL lr RL rotates 0.2× SFT's, at the SFT lr 0.67×: the criterion (≤ 0.5×) holds at one lr of two
    assert _later(r, "pnt-rotation")["verdict"] == "partly agrees"
    assert "at lr 1e-06: grpo 0.01° vs sft-matched 0.05°" in _later(r, "pnt-rotation")["ours"]
    r["stages"]["sft"]["spectral"]["overall"]["principal_angle_left"] = 0.5
    r["stages"]["sft"]["spectral"]["overall"]["principal_angle_right"] = 0.5
    assert _later(r, "pnt-rotation")["verdict"] == "agrees"
    r["stages"]["grpo"]["spectral"]["overall"].update(principal_angle_left=0.04, principal_angle_right=0.04)
    r["stages"]["grpo-sftlr"]["spectral"]["overall"].update(principal_angle_left=0.4, principal_angle_right=0.4)
    assert _later(r, "pnt-rotation")["verdict"] == "differs"
    assert _later(r, "pnt-drift")["verdict"] == "partly agrees"
    # off the principal directions: RL at most 1× a random update's share AND at most 0.5× SFT's
    assert _later(r, "pnt-off-principal")["verdict"] == "partly agrees"  # lr 1e-6: 0.8× vs 3.0×; lr 1e-5: 1.5×
    r["stages"]["grpo"]["spectral"]["overall"]["principal_energy_over_chance"] = 1.6
    assert _later(r, "pnt-off-principal")["verdict"] == "differs"


def test_effective_low_rank_needs_full_numerical_rank_and_few_energy_directions(spectral_results):
    r = spectral_results
    assert _later(r, "effective-low-rank")["verdict"] == "agrees"
    assert "an i.i.d. update 60.0%" in _later(r, "effective-low-rank")["ours"]
    r["stages"]["dpo"]["spectral"]["overall"]["energy_rank_90_ratio"] = 0.4
    assert _later(r, "effective-low-rank")["verdict"] == "partly agrees"
    for n in ("grpo", "dpo"):
        r["stages"][n]["spectral"]["overall"].update(numerical_rank_ratio=0.5, energy_rank_90_ratio=0.4)
    assert _later(r, "effective-low-rank")["verdict"] == "differs"


def test_sgd_claim_needs_far_fewer_updates_at_equal_gain(spectral_results):
    r = spectral_results
    sgd = _stage("grpo-sgd", "grpo", 1e-3, 0.98, acc=0.66)
    sgd["spec"]["optimizer"] = "sgd"
    r["stages"]["grpo-sgd"] = sgd
    c = _later(r, "sgd-sparser")
    assert c["verdict"] == "agrees"  # density 2% ≤ 0.1 × 27.7%, gain +1.9 vs +1.5 points
    sgd["sparsity"]["bf16"]["1e-05"] = 0.9  # 10% updated: more than a tenth of AdamW's
    assert _later(r, "sgd-sparser")["verdict"] == "partly agrees"
    sgd["accuracy"][TASK]["bf16"]["accuracy"] = 0.55  # far below AdamW's gain
    assert _later(r, "sgd-sparser")["verdict"] == "differs"


def test_sgd_stages_change_none_of_the_papers_claims(spectral_results, monkeypatch):
    import rlsubnet.lab.report as report

    monkeypatch.setattr(report, "render_figures", lambda results, executor=None: {})  # synthetic: no figure data
    r = spectral_results
    before = claims.assess(records.adamw_view(copy.deepcopy(r)))
    for name, algo, data in (("grpo-sgd", "grpo", "prompts"), ("sft-sgd", "sft", "gold")):
        s = _stage(name, algo, 1e-3, 0.3, data=data, fp32=0.5, acc=0.2)
        s["spec"]["optimizer"] = "sgd"
        r["stages"][name] = s
    assert claims.assess(records.adamw_view(r)) == before
    assert "grpo-sgd" not in records.rl_stages(records.adamw_view(r))
    report.prepare_report(r)
    ids = [c["id"] for c in r["claims"]]
    assert ids[: len(before)] == [c["id"] for c in before]
    assert {"sgd-sparser", "pnt-rotation", "pnt-drift", "pnt-off-principal", "effective-low-rank"} <= set(ids)
    md = markdown.render_markdown(r, r["claims"], list(r["figures"]))
    assert "## The optimizer as a cause" in md and "## Where the update points" in md
    assert "| `grpo-sgd` | sgd | 0.001 |" in md


def _prediction_results(f1, mag, ceiling, ident_predicted):
    def scored(f, m):
        return {"f1": f, "baselines": {"magnitude": {"f1": m}}}

    def row(run, role, identity):
        return {"run": run, "role": role, "identity": [{"atol": 1e-5, "identity": identity}]}

    return {
        "prediction": {
            "settings": {"predictor": "probe"},
            "stages": {
                n: {"predictors": {"probe": scored(f1[i], mag[i])}, "ceiling": {"f1": ceiling[i]}}
                for i, n in enumerate(("grpo", "dpo"))
            },
        },
        "subnetwork": {
            "reruns": {
                "grpo": {
                    "rows": [
                        row("grpo-subnet", "subnetwork re-run", 0.99),
                        row("grpo-predicted", "predicted-mask re-run", ident_predicted),
                        row("grpo-random", "random-mask re-run", 0.79),
                    ]
                }
            }
        },
    }


def test_prediction_goals_at_and_beside_their_bounds():
    from rlsubnet.lab.report.prediction_markdown import prediction_goals

    # exactly at every bound: all met (0.86 - 0.76 is 0.0999... in floats; a bound is still a bound)
    goals = prediction_goals(_prediction_results((0.85, 0.86), (0.70, 0.76), (0.90, 0.91), 0.89))
    assert [g["met"] for g in goals] == [True] * 7
    # just beside each bound: none met
    goals = prediction_goals(_prediction_results((0.849, 0.849), (0.75, 0.75), (0.9, 0.9), 0.889))
    assert [g["met"] for g in goals] == [False] * 7
    assert "0.49 of the gap" in goals[-1]["reached"]
    # a prediction above the ceiling is within it; a missing ceiling is not measured, not met
    res = _prediction_results((0.95, 0.95), (0.7, 0.7), (0.9, 0.9), 0.95)
    del res["prediction"]["stages"]["dpo"]["ceiling"]
    goals = prediction_goals(res)
    assert goals[2]["met"] is True and "above the ceiling" in goals[2]["reached"] and goals[5]["met"] is None
    # without the predicted re-run the last goal is not measured
    del res["subnetwork"]
    assert prediction_goals(res)[-1]["met"] is None
