"""The probe: K recorded steps, extrapolated to T and checked against a real run of T steps."""

from __future__ import annotations

import pytest
import torch
from predict_toy import grad_fn_for, make_toy, realized_mask, state, train

import rlsubnet
from rlsubnet.diff.changed import ChangedTest
from rlsubnet.errors import MismatchError, UsageError
from rlsubnet.predict import Plan, ProbeError, ProbeStats, evaluate, run_probe

PLAN = Plan(steps=40, lr=1e-6)
K = 4


@pytest.fixture(scope="module")
def toy_run():
    """θ0, a probe of K steps, and the realized mask of the full run on the same gradients."""
    model = make_toy()
    base = state(model)
    grad_fn = grad_fn_for(noise=1.0)
    probe = run_probe(model, grad_fn, PLAN, K, run_id="toy-run")
    assert all(torch.equal(t, base[n].float()) for n, t in state(model, torch.float32).items())  # back at θ0
    train(model, PLAN, grad_fn, K)  # the real run's first K steps
    after_k = state(model, torch.float32)
    model = make_toy()
    train(model, PLAN, grad_fn)  # the real run
    return base, probe, after_k, realized_mask(base, model)


def test_probe_records_the_real_first_k_steps(toy_run):
    base, probe, after_k, _ = toy_run
    assert probe.steps == K and probe.lrs == [1e-6] * K and probe.run_id == "toy-run"
    for name, master in probe.master.items():
        assert torch.equal(master, after_k[name])  # the probe's masters are the run's after K steps, bit for bit
    assert set(probe.exp_avg) == set(probe.master)  # Adam's moments come along


def test_probe_extrapolation_beats_the_budget_and_the_magnitude_baseline(toy_run):
    base, probe, _, realized = toy_run
    assert 0.05 < realized.density < 0.5  # the run changes part of the model, not all of it
    budget = evaluate(realized, rlsubnet.predict(base, PLAN), base=base)
    pred = rlsubnet.predict(base, PLAN, probe)
    scored = evaluate(realized, pred, base=base)
    assert scored["average_precision"] > budget["average_precision"] + 0.05
    assert scored["at_realized_density"]["f1"] > scored["baselines"]["magnitude"]["at_realized_density"]["f1"] + 0.03
    # the expected density is an honest estimate of what the run realizes
    assert abs(pred.expected_density - realized.density) < 0.35 * realized.density
    # what the probe already changed is predicted changed outright
    test = ChangedTest(torch.bfloat16, torch.bfloat16, PLAN.atol, PLAN.mode)
    for name, master in probe.master.items():
        already = torch.from_numpy(test.changed(base[name], master.to(torch.bfloat16))[0].copy())
        assert (pred.probabilities[name].reshape(-1)[already] == 1).all()


def test_probe_file_round_trip_and_checks(toy_run, tmp_path):
    base, probe, _, _ = toy_run
    path = probe.save(tmp_path / "probe.safetensors")
    back = ProbeStats.load(path)
    assert back.steps == probe.steps and back.lrs == probe.lrs and back.run_id == probe.run_id
    assert all(torch.equal(back.grad_sq[n], probe.grad_sq[n]) for n in probe.names())
    p1 = rlsubnet.predict(base, PLAN, probe).probabilities
    p2 = rlsubnet.predict(base, PLAN, path).probabilities
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ProbeError, match="not a readable probe file"):
        ProbeStats.load(junk)
    with pytest.raises(ProbeError, match="no such probe file"):
        ProbeStats.load(tmp_path / "nope")


def test_probe_of_another_model_or_other_weights_is_refused(toy_run):
    base, probe, _, _ = toy_run
    other = {n: t.clone() for n, t in base.items()}
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    with pytest.raises(MismatchError, match="probe is of another model.*up_proj"):
        rlsubnet.predict(other, PLAN, probe)
    moved = {n: (t.float() * 1.5).to(torch.bfloat16) for n, t in base.items()}
    with pytest.raises(ProbeError, match="started from other weights"):
        rlsubnet.predict(moved, PLAN, probe)
    with pytest.raises(UsageError, match="more than the plan's"):
        rlsubnet.predict(base, Plan(steps=3, lr=1e-6), probe)


def test_probe_that_yields_no_gradient_for_a_tensor():
    model = make_toy()

    def grad_fn(m, step):
        (m.up.sum() * 0 + m.down.sum()).backward()  # never reaches the norm

    with pytest.raises(ProbeError, match="no gradient for tensor 'model.layers.0.input_layernorm.weight'"):
        run_probe(model, grad_fn, PLAN, K)
    with pytest.raises(UsageError, match="probe steps must be at least 2"):
        run_probe(model, grad_fn_for(), PLAN, 1)


def test_gradients_returned_as_a_dict():
    model = make_toy()
    names = [n for n, _ in model.named_parameters()]

    def grad_fn(m, step):
        return {n: torch.full_like(p, 1.0 if step % 2 else -1.0) for n, p in zip(names, m.parameters())}

    probe = run_probe(model, grad_fn, PLAN, K)
    assert all(float(probe.grad_sum[n].abs().max()) == 0 for n in names)  # ±1 alternating: no mean
    assert all(float(probe.grad_sq[n].min()) == K for n in names)


def test_recorder_with_a_limit_records_only_the_first_steps_of_a_longer_run():
    """What a full run's own probe records: the first K steps, then nothing; the run goes on unchanged."""
    from rlsubnet.predict.probe import GradientRecorder

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    grads = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(5)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    rec = GradientRecorder(params, limit=3)
    rec.attach(opt, run_id="r")
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    after = []
    for step in range(5):
        for m, o in ((model, opt), (twin, twin_opt)):
            for n, p in m.named_parameters():
                p.grad = grads[step][n].clone()
            o.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    final = rec.final
    assert final is not None and final.steps == 3 and final.lrs == [1e-2] * 3 and final.run_id == "r"
    assert len(rec.lrs) == 3  # quiet after the limit
    for n in params:
        assert torch.equal(final.master[n], after[2][n])
        assert torch.equal(final.grad_sum[n], grads[0][n] + grads[1][n] + grads[2][n])
        assert torch.equal(params[n], dict(twin.named_parameters())[n])  # the hooks changed nothing
    rec.detach()
    assert not rec.handles
