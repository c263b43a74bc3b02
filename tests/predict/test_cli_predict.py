"""`rlsubnet predict` on the command line: predict, write, fit, evaluate; bad input in one line, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from predict_toy import grad_fn_for, make_toy, state, train

from rlsubnet.checkpoint import SafetensorsWriter, save_state_dict
from rlsubnet.cli.main import main
from rlsubnet.masks import Mask, build_mask
from rlsubnet.predict import Plan, Prediction, run_probe

PLAN_ARGS = ["--steps", "30", "--lr", "1e-6"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_writes_a_mask_the_other_commands_read(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    out, probs = tmp_path / "pred.mask.safetensors", tmp_path / "p.safetensors"
    rc, text, err = _run(capsys, "predict", base, *PLAN_ARGS, "-o", out, "--probabilities", probs)
    assert rc == 0 and "wrote" in text and "budget prediction" in text, err
    mask = Mask.load(out)
    pred = Prediction.load(probs)
    assert mask.kind == "predicted" and mask.atol == 1e-5 and mask.mode == "bf16"
    info = mask.meta["extra"]["prediction"]
    assert info["predictor"] == "budget" and info["plan"]["steps"] == 30 and info["cut"]["rule"] == "expected density"
    assert mask.changed == round(pred.expected_density * mask.numel) or abs(mask.density - pred.expected_density) < 1e-3
    # the base is recorded as `rlsubnet mask` records it: overlap finds the same weights
    realized = build_mask(base, tuned)
    assert mask.meta["base"]["content_hash"] == realized.meta["base"]["content_hash"]
    rc, text, _ = _run(capsys, "mask", "--info", out, "--json")
    assert rc == 0 and json.loads(text)["kind"] == "predicted"
    realized.save(tmp_path / "real.mask.safetensors")
    rc, text, err = _run(capsys, "overlap", out, tmp_path / "real.mask.safetensors", "--base", base, "--json")
    assert rc == 0 and "warning" not in err
    rc, text, _ = _run(capsys, "predict", base, *PLAN_ARGS, "-o", tmp_path / "d.safetensors", "--density", "0.1", "--json")
    summary = json.loads(text)
    assert rc == 0 and summary["density"] == pytest.approx(0.1, abs=1e-3) and "expected_density" in summary


def test_evaluate_json_has_the_documented_keys(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    build_mask(base, tuned).save(tmp_path / "real.safetensors")
    _run(capsys, "predict", base, *PLAN_ARGS, "-o", tmp_path / "pred.safetensors", "--probabilities", tmp_path / "p.safetensors")
    for pred in ("pred.safetensors", "p.safetensors"):
        rc, text, err = _run(capsys, "predict", "--evaluate", tmp_path / "real.safetensors", tmp_path / pred, "--json")
        assert rc == 0, err
        r = json.loads(text)
        assert {"precision", "recall", "f1", "average_precision", "density_predicted", "density_realized",
                "baselines", "layers", "modules"} <= set(r)
        for b in ("magnitude", "random"):
            assert {"precision", "recall", "f1"} <= set(r["baselines"][b])
        assert r["baselines"]["random"]["precision"] == pytest.approx(r["density_realized"])
    rc, text, _ = _run(capsys, "predict", "--evaluate", tmp_path / "real.safetensors", tmp_path / "p.safetensors")
    assert rc == 0 and "magnitude baseline" in text and "avg precision" in text


def _toy_run(tmp_path, seed: int):
    """θ0 as a safetensors file, the probe of a run, and the run's realized mask (built from its bf16 result)."""
    plan = Plan(steps=30, lr=1e-6)
    model = make_toy()
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        save_state_dict(state(model), base_dir)
    grad_fn = grad_fn_for(noise=1.0, teacher_seed=seed)
    probe = run_probe(model, grad_fn, plan, 3, run_id=f"run-{seed}")
    probe_path = probe.save(tmp_path / f"probe{seed}.safetensors")
    train(model, plan, grad_fn)
    tuned = tmp_path / f"tuned{seed}"
    save_state_dict(state(model), tuned)
    real = tmp_path / f"real{seed}.safetensors"
    build_mask(base_dir, tuned).save(real)
    return base_dir, probe_path, real


def test_fit_on_one_run_predict_and_score_another(tmp_path, capsys):
    base, probe_a, real_a = _toy_run(tmp_path, 1)
    _, probe_b, real_b = _toy_run(tmp_path, 2)
    cal = tmp_path / "cal.json"
    rc, text, err = _run(capsys, "predict", base, *PLAN_ARGS, "--probe", probe_a, "--fit", real_a, "-o", cal)
    assert rc == 0 and "refuses to predict" in text, err
    out = tmp_path / "b.safetensors"
    rc, _, err = _run(capsys, "predict", base, *PLAN_ARGS, "--probe", probe_b, "--calibration", cal, "-o", out)
    assert rc == 0, err
    assert Mask.load(out).meta["extra"]["prediction"]["predictor"] == "calibrated"
    rc, text, _ = _run(capsys, "predict", "--evaluate", real_b, out, "--json")
    assert rc == 0 and json.loads(text)["f1"] is not None
    rc, _, err = _run(capsys, "predict", "--evaluate", real_a, out)
    assert rc == 2 and "fitted on this realized mask" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "predict", base, *PLAN_ARGS, "--probe", probe_a, "--calibration", cal, "-o", tmp_path / "a.safetensors")
    assert rc == 2 and "fitted on run run-1" in err and not (tmp_path / "a.safetensors").exists()
    rc, _, err = _run(capsys, "predict", base, *PLAN_ARGS, "--probe", probe_b, "-o", tmp_path / "p.safetensors",
                      "--predictor", "probe")
    assert rc == 0, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "{base}", "--steps", "10", "--optimizer", "lion", "-o", "{out}"], "unknown --optimizer 'lion'"),
        (["predict", "{base}", "--steps", "10", "--lr", "-1e-6", "-o", "{out}"], "--lr must be"),
        (["predict", "{base}", "--steps", "-5", "-o", "{out}"], "--steps must be at least 1"),
        (["predict", "{base}", "--schedule", "cosine", "-o", "{out}"], "the plan needs --steps"),
        (["predict", "{base}", "--steps", "10", "--optimizer", "sgd", "-o", "{out}"], "needs the gradient scale"),
        (["predict", "{ints}", "--steps", "10", "-o", "{out}"], "float tensors only"),
        (["predict", "{base}", "--steps", "10", "--probe", "{probe}", "-o", "{out}"], "probe is of another model"),
        (["predict", "{base}", "--steps", "10", "--predictor", "probe", "-o", "{out}"], "needs a probe"),
        (["predict", "{base}", "--steps", "10", "-o", "{out}", "--probabilities", "{out}"], "same file"),
        (["predict", "{base}", "--steps", "10"], "-o FILE"),
        (["predict", "--evaluate", "{other}", "{pred}"], "another model"),
        (["predict", "--evaluate", "{real}", "{badprobs}"], "out of [0, 1]"),
        (["predict", "--evaluate", "{real}"], "REALIZED PRED"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(bad_inputs, tmp_path, capsys, argv, message):
    out = tmp_path / "new.safetensors"
    paths = {**bad_inputs, "out": out}
    rc, text, err = _run(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2 and text == ""
    assert err.startswith("rlsubnet: error:") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files for the bad-input cases, made once."""
    from rlsubnet.testing import llama_specs, write_synthetic_pair

    d = tmp_path_factory.mktemp("bad")
    base, tuned = d / "base", d / "tuned"
    write_synthetic_pair(base, tuned, specs=llama_specs(layers=1, hidden=16, intermediate=32, vocab=24))
    real = d / "real.safetensors"
    build_mask(base, tuned).save(real)
    pred = d / "pred.safetensors"
    assert main(["predict", str(base), "--steps", "10", "-o", str(pred), "-q"]) == 0
    other = d / "other.safetensors"
    Mask.from_bool({"w": torch.ones(3, dtype=torch.bool)}, {"atol": 1e-5, "dtype": "bf16"}).save(other)
    ints = d / "ints"
    save_state_dict({"w": torch.zeros(4, dtype=torch.bfloat16), "ids": torch.arange(4)}, ints)
    probe = run_probe(make_toy(), grad_fn_for(), Plan(steps=10, lr=1e-6), 2).save(d / "probe.safetensors")
    badprobs = d / "bad.safetensors"
    shapes = Mask.load(real).shapes
    meta = {"format": "rlsubnet.probabilities", "encoding": "float16"}
    with SafetensorsWriter(badprobs, [(n, torch.float16, s) for n, s in shapes.items()], meta) as w:
        for n, s in shapes.items():
            w.write(n, torch.full(s, 2.0, dtype=torch.float16))
    return {"base": base, "ints": ints, "probe": probe, "other": other, "pred": pred, "real": real, "badprobs": badprobs}


def test_existing_output_is_kept(sharded_pair, tmp_path, capsys):
    base, _, _, _ = sharded_pair
    out = tmp_path / "pred.safetensors"
    out.write_bytes(b"keep")
    rc, _, err = _run(capsys, "predict", base, "--steps", "10", "-o", out)
    assert rc == 2 and "exists" in err and out.read_bytes() == b"keep"
