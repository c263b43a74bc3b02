"""The probe of a lab stage: its first K steps are the full run's first K steps, bit for bit; the demo's full runs
record that probe on the way, and its predictions section is what the files say."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rlsubnet
from rlsubnet.lab.config import StageSpec
from rlsubnet.masks import Mask
from rlsubnet.predict import ProbeStats, evaluate, plan_of_stage, probe_stage


@pytest.mark.parametrize("name", ["grpo", "dpo"])
def test_probe_stage_replays_the_first_steps(micro_demo, tmp_path, name):
    out, results = micro_demo
    torch.set_num_threads(results["config"]["threads"])
    record = json.loads((out / "stages" / name / "stage.json").read_text())
    spec = StageSpec(**record["spec"])
    theta0 = out / "stages" / "pretrain" / "model"
    samples = out / "stages" / "samples" / "samples.jsonl"
    probe = probe_stage(spec, 2, base_dir=theta0, out_dir=tmp_path / "probe", samples_path=samples)
    assert probe.run_id == record["fingerprint"]  # the full run the probe belongs to
    snap = load_file(out / "stages" / name / "snapshots" / "step-000002.safetensors")
    assert all(torch.equal(snap[n], probe.master[n].to(torch.bfloat16)) for n in snap)
    assert probe.steps == 2 and probe.lrs == [spec.learning_rate] * 2 and probe.exp_avg
    # a finished probe with the same fingerprint is reused, not re-run
    stamp = (tmp_path / "probe" / "stage.json").stat().st_mtime_ns
    again = probe_stage(spec, 2, base_dir=theta0, out_dir=tmp_path / "probe", samples_path=samples)
    assert (tmp_path / "probe" / "stage.json").stat().st_mtime_ns == stamp and again.run_id == probe.run_id
    assert ProbeStats.load(tmp_path / "probe" / "probe.safetensors").steps == 2
    # the probe the full run recorded of its own first 2 steps is the separate probe's, bit for bit
    own = ProbeStats.load(out / "stages" / name / "probe.safetensors")
    assert own.steps == probe.steps and own.lrs == probe.lrs and own.run_id == probe.run_id
    for kind in ("master", "grad_sum", "grad_sq", "exp_avg", "exp_avg_sq"):
        a, b = getattr(own, kind), getattr(probe, kind)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), kind
    pred = rlsubnet.predict(theta0, plan_of_stage(spec), probe)
    realized = out / "masks" / f"{name}.mask.safetensors"
    scored = evaluate(realized, pred)
    assert scored["density_realized"] > 0 and 0 <= scored["average_precision"] <= 1


def test_sgd_stage_probe_is_sgd_and_matches_the_run(micro_demo, tmp_path):
    """An SGD stage is probed with its own optimizer (plain SGD: no Adam moments), and its plan says SGD."""
    out, results = micro_demo
    torch.set_num_threads(results["config"]["threads"])
    record = json.loads((out / "stages" / "sft-sgd" / "stage.json").read_text())
    spec = StageSpec(**record["spec"])
    plan = plan_of_stage(spec)
    assert plan.optimizer == "sgd" and plan.momentum == 0 and plan.lr == spec.learning_rate
    probe = probe_stage(spec, 2, base_dir=out / "stages" / "pretrain" / "model", out_dir=tmp_path / "p")
    assert probe.optimizer["class"] == "torch.optim.sgd.SGD" and not probe.exp_avg
    own = ProbeStats.load(out / "stages" / "sft-sgd" / "probe.safetensors")
    assert all(torch.equal(own.master[n], probe.master[n]) for n in own.master)
    assert all(torch.equal(own.grad_sum[n], probe.grad_sum[n]) for n in own.grad_sum)


def _bits(mask):
    return torch.cat([mask.tensor(n).reshape(-1) for n in mask.names()])


def test_demo_prediction_section_agrees_with_the_files(micro_demo):
    """Every finetuning stage is scored or skipped with a reason; the scores, the seed ceiling and the predicted
    mask agree with a recomputation from the mask files; the calibration was fitted on another run."""
    out, results = micro_demo
    pred = results["prediction"]
    assert set(pred["stages"]) | set(pred["skipped"]) == set(results["stages"])
    assert not set(pred["stages"]) & set(pred["skipped"])
    real = Mask.load(out / "masks" / "grpo.mask.safetensors")
    guess = Mask.load(out / "masks" / "predicted-grpo.mask.safetensors")
    row = pred["stages"]["grpo"]
    assert row["probe_steps"] == 2 and row["steps"] == 4
    assert guess.kind == "predicted" and guess.meta["extra"]["prediction"]["predictor"] == "probe"
    assert guess.meta["extra"]["prediction"]["probe"]["steps"] == 2
    r, g = _bits(real), _bits(guess)
    tp = int((r & g).sum())
    s = row["predictors"]["probe"]
    assert s["precision"] == pytest.approx(tp / int(g.sum()), abs=1e-12)
    assert s["recall"] == pytest.approx(tp / int(r.sum()), abs=1e-12)
    assert s["density_predicted"] == pytest.approx(guess.density, abs=1e-12)
    seed1 = _bits(Mask.load(out / "masks" / "grpo-seed1.mask.safetensors"))
    assert row["ceiling"]["run"] == "grpo-seed1"
    assert row["ceiling"]["f1"] == pytest.approx(2 * int((r & seed1).sum()) / (int(r.sum()) + int(seed1.sum())))
    for name in ("grpo", "dpo"):
        cal = pred["stages"][name]["calibration"]
        assert cal["run"] == f"{name}-seed1" != name
        fitted = json.dumps(cal["fitted_on"])
        own_fp = json.loads((out / "stages" / name / "stage.json").read_text())["fingerprint"]
        assert own_fp not in fitted  # the scored run is not the one the rule was fitted on
        seed_fp = json.loads((out / "stages" / f"{name}-seed1" / "stage.json").read_text())["fingerprint"]
        assert cal["fitted_on"]["run_id"] == seed_fp
        assert set(pred["stages"][name]["predictors"]) == {"probe", "budget", "calibrated"}
    # grpo-predicted trained on exactly that mask
    rec = json.loads((out / "stages" / "grpo-predicted" / "stage.json").read_text())
    assert rec["extra"]["mask"]["bits_sha256"] == guess.bits_sha256()
    report = (out / "report.md").read_text()
    assert "## Predicting the subnetwork" in report and "`grpo-predicted` closer to θ_full" in report


def test_a_stage_without_probe_is_skipped_and_a_failed_calibration_is_reported(micro_demo, tmp_path, monkeypatch):
    """Whichever process scores it: a run that recorded no probe is skipped with its reason (not a crash after the
    training), and a calibration that cannot be fitted is recorded as such beside the other predictors."""
    import dataclasses

    from rlsubnet.errors import UsageError
    from rlsubnet.lab import predicting
    from rlsubnet.lab.stages import StageResult
    from rlsubnet.lab.subnet import MaskStore

    out, results = micro_demo
    theta0 = out / "stages" / "pretrain" / "model"
    load = lambda n: StageResult.load(out / "stages" / n)  # noqa: E731
    specs = {n: StageSpec(**json.loads((out / "stages" / n / "stage.json").read_text())["spec"])
             for n in ("sft", "dpo", "dpo-seed1")}
    no_probe = load("sft")
    record = {**no_probe.record, "extra": {}}
    no_probe = dataclasses.replace(no_probe, record=record)

    def cannot_fit(*a, **k):
        raise UsageError("nothing left to fit")

    monkeypatch.setattr("rlsubnet.predict.calibrate.fit_calibration", cannot_fit)
    store = MaskStore(tmp_path, theta0, 0)
    got = predicting.measure_predictions(theta0, {"sft": no_probe, "dpo": load("dpo")}, {"dpo-seed1": load("dpo-seed1")},
                                         specs, store, 0)
    assert got["skipped"] == {"sft": "its run recorded no probe (fewer than 2 steps)"}
    row = got["stages"]["dpo"]
    assert row["calibration"] == {"run": "dpo-seed1", "skipped": "nothing left to fit"}
    assert set(row["predictors"]) == {"probe", "budget"} and row["ceiling"]["run"] == "dpo-seed1"
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "dpo-seed1.mask.safetensors", "dpo.mask.safetensors", "sft.mask.safetensors"]
    k = row["changed_by_step_k"]
    assert 0 < k["changed"] and 0 < k["share_of_realized"] <= 1


def test_other_predictors_made_in_a_worker_are_the_ones_made_inline(micro_demo, tmp_path):
    """The demo hands the predictors that need a seed + 1 run to its idle workers while it measures the
    subnetworks: what comes back is what the main process computes itself, figure for figure."""
    from concurrent.futures import ThreadPoolExecutor

    from rlsubnet.lab import predicting
    from rlsubnet.lab.stages import StageResult
    from rlsubnet.lab.subnet import MaskStore

    out, results = micro_demo
    torch.set_num_threads(results["config"]["threads"])
    theta0 = out / "stages" / "pretrain" / "model"
    names = ("grpo", "grpo-seed1", "dpo", "dpo-seed1")
    runs = {n: StageResult.load(out / "stages" / n) for n in names}
    specs = {n: StageSpec(**json.loads((out / "stages" / n / "stage.json").read_text())["spec"]) for n in names}
    stages = {n: runs[n] for n in ("grpo", "dpo")}
    extra = {n: runs[n] for n in ("grpo-seed1", "dpo-seed1")}
    assert predicting.start_detailed(theta0, stages, extra, specs, 0, None) == {}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inline = predicting.measure_predictions(theta0, stages, extra, specs, MaskStore(tmp_path / "a", theta0, 0), 0)
    with ThreadPoolExecutor(1) as pool:
        futures = predicting.start_detailed(theta0, stages, extra, specs, 0, pool)
        assert set(futures) == {"grpo", "dpo"}
        beside = predicting.measure_predictions(theta0, stages, extra, specs, MaskStore(tmp_path / "b", theta0, 0), 0,
                                                detailed=futures)

    def figures(d):
        return {n: {k: v for k, v in row.items() if k != "cpu_s"} for n, row in d["stages"].items()}

    assert figures(beside) == figures(inline)
    assert set(inline["stages"]["grpo"]["predictors"]) >= {"probe", "budget"}
    assert inline["stages"]["grpo"]["ceiling"]["run"] == "grpo-seed1"
    assert sorted(p.name for p in (tmp_path / "b" / "masks").iterdir()) == sorted(
        f"{n}.mask.safetensors" for n in names)
