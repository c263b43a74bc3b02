"""Evaluation figures on constructed masks and probabilities whose precision, recall and AP are known."""

from __future__ import annotations

import json

import pytest
import torch
from predict_toy import grad_fn_for, make_toy, realized_mask, state, train

import rlsubnet
from rlsubnet.checkpoint import SafetensorsWriter
from rlsubnet.errors import UsageError
from rlsubnet.masks import Mask, MaskMismatchError
from rlsubnet.predict import (
    CalibrationLeakError,
    Plan,
    Prediction,
    PredictionError,
    evaluate,
    fit_calibration,
    run_probe,
)
from rlsubnet.predict.scoring import Histogram

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
PLAN = Plan(steps=10, lr=1e-6, atol=1e-5)


def _mask(bits: dict, **meta) -> Mask:
    return Mask.from_bool({n: torch.tensor(b, dtype=torch.bool) for n, b in bits.items()}, {"atol": 1e-5, "dtype": "bf16", **meta})


@pytest.fixture
def case():
    """10 + 10 entries; |w| decreasing along each tensor (so |w| ranks the later entries first)."""
    base = {
        Q: torch.linspace(0.02, 0.001, 10).to(torch.bfloat16),
        UP: torch.linspace(0.03, 0.002, 10).to(torch.bfloat16),
    }
    realized = _mask({Q: [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], UP: [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]})
    return base, realized


def test_precision_recall_f1_of_a_predicted_mask(case):
    base, realized = case
    pred = _mask({Q: [1, 1, 0, 0, 1, 0, 0, 0, 0, 0], UP: [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]}, kind="predicted")
    r = evaluate(realized, pred, base=base)
    # TP 3 of 4 predicted, 6 realized
    assert (r["precision"], r["recall"]) == (0.75, 0.5) and r["f1"] == pytest.approx(0.6)
    assert r["density_predicted"] == 4 / 20 and r["density_realized"] == 6 / 20
    # a binary score: 4 entries at 1 (3 hits), 16 at 0 (3 hits); AP = 3/6·3/4 + 3/6·6/20
    assert r["average_precision"] == pytest.approx(0.5 * 0.75 + 0.5 * 0.3)
    # at the realized density (6): all 4 ones, then 2 of the 16 tied zeros, 3/16 of them hits on average
    assert r["at_realized_density"]["precision"] == pytest.approx((3 + 2 * 3 / 16) / 6)
    # random at equal density, exactly: precision = realized density, recall = predicted density
    rnd = r["baselines"]["random"]
    assert rnd["precision"] == pytest.approx(0.3) and rnd["recall"] == pytest.approx(0.2)
    assert rnd["average_precision"] == pytest.approx(0.3)
    # |w|: the 4 smallest are the last two of q (0 hits... ) and of up (2 hits)
    mag = r["baselines"]["magnitude"]
    smallest = sorted(range(20), key=lambda i: float(torch.cat([base[Q], base[UP]]).float()[i]))[:4]
    hits = sum(torch.cat([realized.tensor(Q), realized.tensor(UP)])[i].item() for i in smallest)
    assert mag["precision"] == pytest.approx(hits / 4)
    modules = {m["module"]: m for m in r["modules"]}
    assert modules["q"]["precision"] == pytest.approx(2 / 3) and modules["q"]["recall"] == 0.5
    assert modules["up"]["precision"] == 1.0 and modules["up"]["recall"] == 0.5
    assert [g["layer"] for g in r["layers"]] == [0, 1]
    assert set(r) >= {"precision", "recall", "f1", "average_precision", "density_predicted", "density_realized",
                      "baselines", "layers", "modules"}
    assert set(r["baselines"]["magnitude"]) >= {"precision", "recall", "f1"}


def test_average_precision_with_ties_by_hand(case):
    base, realized = case
    # scores: two realized entries at 0.9 with one miss, the rest of the hits at 0.5 with 4 misses, others 0
    q = [0.9, 0.9, 0.5, 0.5, 0.9, 0.5, 0.5, 0.0, 0.0, 0.0]
    up = [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.5, 0.5]
    pred = Prediction({Q: torch.tensor(q), UP: torch.tensor(up)}, PLAN, {"predictor": "test"})
    r = evaluate(realized, pred, base=base)
    # levels: 0.9 -> 3 entries, 2 hits; 0.5 -> 8 entries, 4 hits; 0 -> 9 entries, 0 hits
    ap = 2 / 6 * (2 / 3) + 4 / 6 * (6 / 11)
    assert r["average_precision"] == pytest.approx(ap)
    # at the realized density (6): the 3 at 0.9 and 3 of the 8 at 0.5 (half of them hits): 2 + 1.5
    assert r["at_realized_density"]["recall"] == pytest.approx(3.5 / 6)
    h = Histogram()
    h.add(torch.tensor([3, 3, 1, 1]).numpy(), torch.tensor([1, 0, 1, 0]).numpy())
    assert h.average_precision() == pytest.approx(0.5 * 0.5 + 0.5 * 0.5) and h.cut(1)[2] == 0.5


def test_predicted_mask_cut_and_probabilities_file(case, tmp_path):
    base, realized = case
    p = {Q: torch.linspace(1.0, 0.1, 10), UP: torch.full((10,), 0.5)}
    pred = Prediction(p, PLAN, {"predictor": "test"})
    assert pred.expected_density == pytest.approx(float(sum(t.sum() for t in p.values())) / 20)
    m = pred.mask(density=0.5)
    assert m.changed == 10 and m.kind == "predicted" and m.atol == 1e-5 and m.mode == "bf16"
    assert m.tensor(Q)[:5].all() and m.count(UP) == 5 and m.tensor(UP)[:5].all()  # ties: lowest index first
    assert pred.mask(threshold=0.5).changed == 5 + 10
    path = pred.save_probabilities(tmp_path / "p.safetensors")
    back = Prediction.load(path)
    assert max(float((back.probabilities[n] - p[n]).abs().max()) for n in p) <= 0.5 / 255 + 1e-6
    assert evaluate(realized, path, base=base)["average_precision"] is not None
    fp16 = Prediction.load(pred.save_probabilities(tmp_path / "h.safetensors", "fp16"))
    assert torch.allclose(fp16.probabilities[Q], p[Q], atol=1e-3)


def test_probabilities_out_of_range_are_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    meta = {"format": "rlsubnet.probabilities", "encoding": "float16", "plan": json.dumps(PLAN.to_json())}
    with SafetensorsWriter(path, [(Q, torch.float16, (3,))], meta) as w:
        w.write(Q, torch.tensor([0.5, 1.5, 0.0], dtype=torch.float16))
    with pytest.raises(PredictionError, match="probability 1.5 is out of"):
        Prediction.load(path)
    with pytest.raises(PredictionError, match="out of"):
        Prediction({Q: torch.tensor([float("nan")])}, PLAN)


def test_realized_mask_of_another_model_or_setting(case):
    base, realized = case
    pred = _mask({Q: [0] * 10, UP: [1] * 10}, kind="predicted")
    other = _mask({Q: [0] * 10})
    with pytest.raises(MaskMismatchError, match="another model"):
        evaluate(other, pred, base=base)
    with pytest.raises(UsageError, match="atol 0, the prediction at atol 1e-05"):
        evaluate(_mask({Q: [0] * 10, UP: [1] * 10}, atol=0.0), pred, base=base)
    with pytest.raises(UsageError, match="no base"):
        evaluate(realized, pred)


def test_calibration_never_sees_the_evaluated_run():
    """Fit on run A, predict run B: fine. Scoring the calibrated prediction on A's own mask, or predicting A
    with it, is refused; a rule that leaked would otherwise be scored on what it was fitted to."""
    plan = Plan(steps=30, lr=1e-6)

    def run(seed):
        model = make_toy()
        base = state(model)
        grad_fn = grad_fn_for(noise=1.0, teacher_seed=seed)
        probe = run_probe(model, grad_fn, plan, 3, run_id=f"run-{seed}")
        train(model, plan, grad_fn)
        return base, probe, realized_mask(base, model)

    base, probe_a, real_a = run(1)
    _, probe_b, real_b = run(2)
    cal = fit_calibration(base, plan, real_a, probe_a)
    assert cal.fitted_on["run_id"] == "run-1" and cal.fitted_on["realized_bits_sha256"] == real_a.bits_sha256()
    pred_b = rlsubnet.predict(base, plan, probe_b, calibration=cal)
    assert pred_b.predictor == "calibrated"
    scored = evaluate(real_b, pred_b, base=base)
    assert scored["average_precision"] > scored["baselines"]["random"]["average_precision"]
    with pytest.raises(CalibrationLeakError, match="fitted on this realized mask"):
        evaluate(real_a, pred_b, base=base)
    with pytest.raises(CalibrationLeakError, match="fitted on run run-1"):
        rlsubnet.predict(base, plan, probe_a, calibration=cal)
    # the mask cut from the prediction carries the record too
    with pytest.raises(CalibrationLeakError):
        evaluate(real_a, pred_b.mask(), base=base)
