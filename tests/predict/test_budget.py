"""Rounding distances, the plan, and the budget predictor on hand-built tensors whose distances are known."""

from __future__ import annotations

import math

import pytest
import torch

import rlsubnet
from rlsubnet.diff.changed import ChangedTest
from rlsubnet.errors import UsageError
from rlsubnet.predict import Plan
from rlsubnet.predict.rounding import change_distances

BF16 = torch.bfloat16


def test_distances_of_known_values():
    w = torch.tensor([1.0, -1.0, 0.5, 3e-3, float("inf"), float("nan")], dtype=BF16)
    up, down = change_distances(w, BF16, 0.0, "bf16")
    # 1.0: half of the ulp above (2^-7) upward, a quarter of it downward (the ulp below 1 is 2^-8)
    assert up.tolist()[:3] == [2**-8, 2**-9, 2**-9]
    assert down.tolist()[:3] == [2**-9, 2**-8, 2**-10]
    # 3e-3 lies in [2^-9, 2^-8): ulp 2^-16, half of it both ways
    assert up[3] == down[3] == 2**-17
    assert up[4] == down[4] == up[5] == down[5] == 0  # a non-finite Δ is always "changed"


def test_atol_spanning_several_ulps():
    # 1e-6 has an ulp of ~7e-9: at atol 1e-5 the master must move by about atol, not half an ulp
    w = torch.tensor([1e-6, -1e-6, 0.0], dtype=BF16)
    up, down = change_distances(w, BF16, 1e-5, "bf16")
    assert all(9.9e-6 < d < 1.02e-5 for d in [*up.tolist(), *down.tolist()])
    up0, _ = change_distances(w, BF16, 0.0, "bf16")
    assert up0[0] < 1e-8


@pytest.mark.parametrize("storage, atol, mode", [(BF16, 0.0, "bf16"), (BF16, 1e-5, "bf16"), (BF16, 1e-5, "fp32"),
                                                 (torch.float16, 1e-4, "native"), (torch.float32, 1e-5, "fp32")])
def test_distances_are_exactly_where_the_changed_test_flips(storage, atol, mode):
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(3000, generator=g) * 0.02, torch.randn(500, generator=g) * 1e-5]).to(storage)
    up, down = change_distances(w, storage, atol, mode)
    test = ChangedTest(storage, storage, atol, mode)
    w64 = w.to(torch.float64)

    def changed(master):  # an fp32 master stored in the storage dtype, against θ0
        return torch.from_numpy(test.changed(w, master.to(torch.float32).to(storage))[0].copy())

    # a hair short of the boundary: unchanged; a hair past it: changed (both directions)
    for sign, dist in ((1, up), (-1, down)):
        assert not changed(w64 + sign * dist * (1 - 1e-3)).any()
        assert changed(w64 + sign * dist * (1 + 1e-3)).all()


def test_plan_schedules_match_hugging_face():
    transformers = pytest.importorskip("transformers")
    for schedule, hf in (("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")):
        plan = Plan(steps=20, lr=1e-3, schedule=schedule, warmup=5)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = transformers.get_scheduler(hf, opt, num_warmup_steps=5, num_training_steps=20)
        seen = []
        for _ in range(20):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert plan.lrs().tolist() == pytest.approx(seen, rel=1e-12, abs=1e-18)
    assert Plan(steps=10, lr=2e-6).budget() == pytest.approx((2e-5, 2e-6 * math.sqrt(10)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 10, "optimizer": "lion"}, "unknown --optimizer 'lion'"),
        ({"steps": 10, "lr": -1e-6}, "--lr must be"),
        ({"steps": -3}, "--steps must be at least 1"),
        ({"schedule": "linear"}, "the plan needs --steps"),
        ({"steps": 10, "warmup": 11}, "--warmup 11 is longer"),
        ({"steps": 10, "schedule": "step"}, "unknown --schedule"),
        ({"steps": 10, "betas": (0.9, 1.0)}, "--betas"),
        ({"steps": 10, "momentum": 0.9}, "--momentum is SGD's"),
    ],
)
def test_bad_plans_name_the_option(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        Plan(**kwargs)


def _near_far():
    """bf16 entries whose distances both ways are ≤ 2^-22 (near) or ≥ 2^-13 (far)."""
    near = torch.tensor([2**-14, -(2**-14) * 1.5, 2**-15 * 1.25], dtype=BF16)
    far = torch.tensor([2**-4, -(2**-3), 0.75], dtype=BF16)
    return near, far


def test_budget_one_adam_step_from_the_boundary_against_far_entries():
    lr = 2**-17  # one Adam step moves every entry with a gradient by exactly lr (bias-corrected first step)
    near, far = _near_far()
    w = torch.cat([near, far])
    up, down = change_distances(w, BF16, 0.0, "bf16")
    assert (torch.maximum(up[:3], down[:3]) <= lr / 32).all() and (torch.minimum(up[3:], down[3:]) >= 16 * lr).all()
    pred = rlsubnet.predict({"w": w}, Plan(steps=1, lr=lr, atol=0.0))
    p = pred.probabilities["w"]
    assert (p[:3] > 0.9).all() and (p[3:] < 1e-6).all()
    # the truth: one real AdamW step with gradients of either sign changes exactly the near entries
    for sign in (1.0, -1.0):
        master = torch.nn.Parameter(w.float())
        opt = torch.optim.AdamW([master], lr=lr, weight_decay=0.0, foreach=False)
        master.grad = sign * torch.linspace(0.5, 2.0, w.numel())
        opt.step()
        changed = master.detach().to(BF16) != w
        assert changed.tolist() == [True] * 3 + [False] * 3


def test_budget_grows_with_the_run_and_weight_decay_pulls_to_zero():
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.up_proj.weight": (torch.randn(64, 64, generator=g) * 0.02).to(BF16)}
    short = rlsubnet.predict(base, Plan(steps=10, lr=1e-6)).expected_density
    long = rlsubnet.predict(base, Plan(steps=100, lr=1e-6)).expected_density
    assert 0 < short < long < 1
    # decoupled decay over the run (Σ lr·wd = 0.2) moves a weight by ~18% of itself, far beyond Adam's reach
    # (Σ lr = 1e-4) and its rounding boundary: every entry not too small to move past atol changes
    decayed = rlsubnet.predict(base, Plan(steps=100, lr=1e-6, weight_decay=2000.0))
    p = decayed.probabilities["model.layers.0.mlp.up_proj.weight"]
    w = base["model.layers.0.mlp.up_proj.weight"].float().abs()
    assert p[w > 1e-3].min() > 0.999 and p[w < 1e-5].max() < 0.999
    # vectors (norms, biases) are not decayed, as in the Hugging Face Trainer
    vec = rlsubnet.predict({"norm.weight": torch.ones(4, dtype=BF16)}, Plan(steps=100, lr=1e-6, weight_decay=5.0))
    assert vec.expected_density < 1e-6


def test_budget_is_refused_for_sgd_without_a_probe():
    with pytest.raises(UsageError, match="sgd.*probe"):
        rlsubnet.predict({"w": torch.zeros(3, dtype=BF16)}, Plan(steps=10, lr=0.1, optimizer="sgd"))


def test_non_float_base_is_refused():
    with pytest.raises(UsageError, match="'ids'.*float tensors only"):
        rlsubnet.predict({"w": torch.zeros(3, dtype=BF16), "ids": torch.arange(3)}, Plan(steps=10))
