"""The probe of a lab stage: its first K steps are the full run's first K steps, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rlsubnet
from rlsubnet.lab.config import StageSpec
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
    pred = rlsubnet.predict(theta0, plan_of_stage(spec), probe)
    realized = out / "masks" / f"{name}.mask.safetensors"
    scored = evaluate(realized, pred)
    assert scored["density_realized"] > 0 and 0 <= scored["average_precision"] <= 1
