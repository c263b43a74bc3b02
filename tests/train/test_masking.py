"""The masked optimizer step: frozen entries bit-identical after real steps, the paper's order, weight decay
inside the mask, strict mode, and loud failures. Each guarantee has a control showing the failure it prevents."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from rlsubnet.masks import Mask, MaskError, MaskMismatchError, random_mask
from rlsubnet.train import FullMaskWarning, MaskDtypeWarning, MaskedOptimizer, frozen_changes, frozen_snapshot
from rlsubnet.train import masking as masking_module


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))

    def forward(self, x):
        return self.fc2(self.norm(torch.tanh(self.fc1(self.embed(x)))))


def _mask_for(model, density=0.3, seed=1, frozen_norm=True) -> Mask:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    m = random_mask(shapes, density=density, seed=seed)
    t = {n: m.tensor(n) for n in m.names()}
    if frozen_norm:  # a tensor entirely outside the mask, like the norms in an RL mask
        t["norm.weight"][:] = False
        t["norm.bias"][:] = False
    return Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})


def _train(model, opt, steps=6, clip=0.5, seed=0, before_step=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (8, 5), generator=g)
        y = torch.randint(0, 11, (8, 5), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if before_step:
            before_step()
        opt.step()
        opt.zero_grad()


def _moved(model, mask, before):
    ch = frozen_changes(model, mask, before)
    return sum(f for f, _ in ch.values()), sum(t for _, t in ch.values())


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw-single-tensor": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False, amsgrad=True),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adam-decoupled-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_entries_bit_identical_exact_mode(name):
    model = Net()
    mask = _mask_for(model)
    opt = OPTIMIZERS[name](model.parameters())
    masked = MaskedOptimizer(opt, mask, model, verify_steps=100)
    assert not masked.strict
    before = frozen_snapshot(model, mask)
    _train(model, opt)
    frozen_moved, trainable_moved = _moved(model, mask, before)
    assert frozen_moved == 0
    assert trainable_moved > 0.9 * mask.changed  # the subnetwork did train
    assert masked.steps == 6 and masked.restored_entries == 0
    assert masked.optimizer.param_groups[0]["weight_decay"] == 0.1  # restored after each step


def test_control_weight_decay_moves_frozen_fp32_weights_without_the_mask_handling():
    """Masking only the gradient is not enough: decoupled decay moves 'frozen' weights (lab notes)."""
    model = Net()
    mask = _mask_for(model, frozen_norm=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = frozen_snapshot(model, mask)

    def mask_grads_only():
        for n, p in model.named_parameters():
            p.grad.masked_fill_(~mask.tensor(n), 0)

    _train(model, opt, before_step=mask_grads_only)
    assert _moved(model, mask, before)[0] > 0.5 * (mask.numel - mask.changed)


def test_control_and_fix_momentum_leak_from_a_loaded_state():
    """An SGD momentum buffer from an unmasked run moves frozen entries unless its frozen part is cleared."""
    def warmed_up():
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _train(model, opt, steps=3)  # unmasked: every momentum entry is non-zero
        return model, opt

    model, opt = warmed_up()
    mask = _mask_for(model)
    before = frozen_snapshot(model, mask)

    def mask_grads_only():
        for n, p in model.named_parameters():
            p.grad.masked_fill_(~mask.tensor(n), 0)

    _train(model, opt, steps=2, before_step=mask_grads_only)
    assert _moved(model, mask, before)[0] > 0  # the control: the buffer leaks

    model, opt = warmed_up()
    before = frozen_snapshot(model, mask)
    MaskedOptimizer(opt, mask, model)
    _train(model, opt, steps=2)
    assert _moved(model, mask, before)[0] == 0


def test_load_state_dict_is_cleaned_too():
    donor = Net()
    donor_opt = torch.optim.SGD(donor.parameters(), lr=0.1, momentum=0.9)
    _train(donor, donor_opt, steps=2)
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masked = MaskedOptimizer(opt, mask, model)
    _train(model, opt, steps=1)
    masked.load_state_dict(donor_opt.state_dict())  # non-zero buffers everywhere
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)
    assert _moved(model, mask, before)[0] == 0


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=0.1, momentum=0.5),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
])
def test_strict_mode_any_optimizer(make):
    model = Net()
    mask = _mask_for(model)
    opt = make(model.parameters())
    masked = MaskedOptimizer(opt, mask, model)
    assert masked.strict  # chosen automatically for an optimizer outside the exact list
    before = frozen_snapshot(model, mask)
    _train(model, opt)
    frozen_moved, trainable_moved = _moved(model, mask, before)
    assert frozen_moved == 0 and trainable_moved > 0.9 * mask.changed
    assert masked.restored_entries > 0  # the optimizer's own decay did try to move them: the restore mattered


def test_strict_mode_on_an_exact_optimizer_restores_nothing():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masked = MaskedOptimizer(opt, mask, model, strict=True)
    before = frozen_snapshot(model, mask)
    _train(model, opt)
    assert _moved(model, mask, before)[0] == 0 and masked.restored_entries == 0


def test_unknown_optimizer_without_strict_is_refused():
    model = Net()
    with pytest.raises(MaskError, match=r"^RMSprop is not one of the optimizers whose frozen entries are provably fixed "
                       r"by a zero gradient \(SGD, Adam, AdamW\); use strict=True to restore frozen entries after every step$"):
        MaskedOptimizer(torch.optim.RMSprop(model.parameters()), _mask_for(model), model, strict=False)


def test_verification_catches_an_optimizer_that_moves_frozen_entries(monkeypatch):
    class LeakySGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)
            return None

    monkeypatch.setitem(masking_module.EXACT_STATE_KEYS, LeakySGD, ())
    model = Net()
    mask = _mask_for(model)
    opt = LeakySGD(model.parameters(), lr=0.1)
    MaskedOptimizer(opt, mask, model, strict=False)
    before = frozen_snapshot(model, mask)
    with pytest.raises(MaskError, match=r"^LeakySGD moved frozen entries in step 1 \(embed.weight: \d+, fc1.weight: \d+"):
        _train(model, opt, steps=1)
    assert _moved(model, mask, before)[0] == 0  # restored before raising


def test_clip_then_mask_is_the_default_and_mask_then_clip_is_an_option():
    """Plain SGD, lr 1: the update is the clipped gradient. Clip-then-mask scales by the full gradient's norm;
    mask-then-clip by the masked gradient's norm."""
    clip = 0.05
    results = {}
    for before_clip in (False, True):
        model = Net()
        mask = _mask_for(model, frozen_norm=False)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        masked = MaskedOptimizer(opt, mask, model, mask_before_clip=before_clip)
        x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).pow(2).mean().backward()
        full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if before_clip:
            masked.mask_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        trainable = {n: mask.tensor(n) for n in full}
        masked_grad = {n: torch.where(trainable[n], full[n], torch.zeros_like(full[n])) for n in full}
        norm_of = lambda gs: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs.values()]))  # noqa: E731
        scale = clip / (norm_of(masked_grad if before_clip else full) + 1e-6)
        assert scale < 1  # clipping is active, so the two orders differ
        for n, p in model.named_parameters():
            expected = start[n] - torch.clamp(scale, max=1.0) * masked_grad[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
            assert torch.equal(p.detach()[~trainable[n]], start[n][~trainable[n]])
        results[before_clip] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(results[False]["fc1.weight"], results[True]["fc1.weight"])


def test_closure():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    MaskedOptimizer(opt, mask, model)
    before = frozen_snapshot(model, mask)
    x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        assert opt.step(closure) is not None
    moved = _moved(model, mask, before)
    assert moved[0] == 0 and moved[1] > 0


def test_density_one_mask_reproduces_the_unmasked_run_bit_for_bit():
    runs = []
    for use_mask in (False, True):
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        if use_mask:
            with pytest.warns(FullMaskWarning):
                MaskedOptimizer(opt, Mask.full({n: p.shape for n, p in model.named_parameters()}, True), model)
        _train(model, opt)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.parametrize("impl", [{"foreach": True}, {"foreach": False}])
def test_masked_entries_follow_adamw_exactly_on_the_first_step(impl):
    """Decay applied by the mask equals AdamW's own decay bit for bit (same gradient on step 1)."""
    states = []
    for use_mask in (False, True):
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **impl)
        mask = _mask_for(model)
        if use_mask:
            MaskedOptimizer(opt, mask, model)
        _train(model, opt, steps=1)
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in states[0]:
        t = mask.tensor(n)
        assert torch.equal(states[0][n][t], states[1][n][t]), n


def test_fully_frozen_tensors_get_no_gradient_and_no_state():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masked = MaskedOptimizer(opt, mask, model)
    _train(model, opt, steps=2)
    assert model.norm.weight not in opt.state and model.fc1.weight in opt.state
    assert masked.report()["fully_frozen_tensors"] == 2


def test_remove_stops_masking():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masked = MaskedOptimizer(opt, mask, model)
    masked.remove()
    assert not masked.attached
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=1)
    assert _moved(model, mask, before)[0] > 0
    again = MaskedOptimizer(opt, mask, model)  # can attach again after removal, and masks again
    assert again.attached and opt._rlsubnet_masked is again
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)
    frozen, trainable = _moved(model, mask, before)
    assert frozen == 0 and trainable > 0.9 * mask.changed


# -- loud failures
def test_empty_full_and_dtype_checks():
    model = Net()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MaskError, match="density 0"):
        MaskedOptimizer(opt, Mask.full(shapes, False, {"kind": "changed"}), model)
    with pytest.warns(FullMaskWarning, match="density 1"):
        MaskedOptimizer(opt, Mask.full(shapes, True), model).remove()
    fp32_mask = _mask_for(model)
    fp32_mask.meta["dtype"] = "fp32"
    with pytest.warns(MaskDtypeWarning, match="'fp32'.*'bf16'"):
        MaskedOptimizer(opt, fp32_mask, model).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedOptimizer(opt, fp32_mask, model, compare_mode="fp32").remove()
        MaskedOptimizer(opt, _mask_for(model), model).remove()
    with pytest.warns(DeprecationWarning, match="compare_mode"):  # the option's old name still works
        MaskedOptimizer(opt, fp32_mask, model, compare_dtype="fp32").remove()
    # a mask that covers only tensors the optimizer does not train selects nothing it trains
    only_fc1 = {n: (torch.ones(p.shape, dtype=torch.bool) if n.startswith("fc1") else torch.zeros(p.shape, dtype=torch.bool))
                for n, p in model.named_parameters()}
    opt2 = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    with pytest.raises(MaskError, match="selects none"):
        MaskedOptimizer(opt2, only_fc1, model)


def test_name_and_shape_mismatches():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    good["fc1.weight"][0] = False
    missing = dict(good)
    del missing["fc2.bias"]
    with pytest.raises(MaskMismatchError, match="trainable parameters the mask does not cover: fc2.bias"):
        MaskedOptimizer(opt, missing, model)
    extra = {**good, "fc3.weight": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(MaskMismatchError, match="the model does not have: fc3.weight"):
        MaskedOptimizer(opt, extra, model)
    reshaped = {**good, "fc1.weight": torch.ones(16, 32, dtype=torch.bool)}
    with pytest.raises(MaskMismatchError, match=r"fc1.weight \[16, 32\] in the mask vs \[32, 16\]"):
        MaskedOptimizer(opt, reshaped, model)
    stranger = torch.nn.Parameter(torch.zeros(3))
    opt3 = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(MaskMismatchError, match=r"^the optimizer holds 1 parameters that the model does not name or the "
                       r"mask does not cover \(shapes \[3\]\)"):
        MaskedOptimizer(opt3, good, model)
    MaskedOptimizer(opt, good, model)
    with pytest.raises(MaskError, match=r"^this optimizer is already masked \(call .remove\(\) on the first MaskedOptimizer\)$"):
        MaskedOptimizer(opt, good, model)


def test_corrupt_mask_file_fails_before_training(tmp_path):
    model = Net()
    path = _mask_for(model).save(tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(MaskError, match="corrupt mask"):
        MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), path, model)


def test_tied_weights_and_wrapped_models():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(7, 4)
            self.lm_head = torch.nn.Linear(4, 7, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    w = torch.rand(7, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < int(w.sum()) < w.numel()
    # a checkpoint that stored both names (fine when they agree), or one name only: the one shared parameter
    # trains exactly the entries of w under either name. SGD at lr 0.5 with a gradient of 1 everywhere moves a
    # trainable entry by -0.5 and a frozen one not at all.
    for given in ({"embed_tokens.weight": w, "lm_head.weight": w.clone()}, {"lm_head.weight": w}, {"embed_tokens.weight": w}):
        model = Tied()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        assert len(opt.param_groups[0]["params"]) == 1  # the tied weight is one parameter
        masked = MaskedOptimizer(opt, given, model)
        assert masked.numel == 28 and masked.n_trainable == int(w.sum())
        assert torch.equal(masked.trainable_mask("lm_head.weight"), w)
        assert torch.equal(masked.trainable_mask("embed_tokens.weight"), w)
        before = model.embed_tokens.weight.detach().clone()
        model.embed_tokens.weight.grad = torch.ones(7, 4)
        opt.step()
        expected = torch.where(w, before - 0.5, before)
        assert torch.equal(model.embed_tokens.weight.detach(), expected), sorted(given)
        assert model.lm_head.weight is model.embed_tokens.weight
        masked.remove()
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MaskMismatchError, match="^'embed_tokens.weight' and 'lm_head.weight' are one tied parameter"):
        MaskedOptimizer(opt, {"embed_tokens.weight": w, "lm_head.weight": ~w}, model)
    # DataParallel / DDP prefix "module." is looked through
    wrapped = torch.nn.DataParallel(Net())
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    m = _mask_for(wrapped.module)
    masked = MaskedOptimizer(opt, m, wrapped)
    assert masked.n_trainable == m.changed


def test_a_parameter_group_added_after_attaching_is_masked_too():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.AdamW([{"params": [model.embed.weight, model.fc1.weight, model.fc1.bias]}], lr=1e-2, weight_decay=0.1)
    MaskedOptimizer(opt, mask, model)
    masked = opt._rlsubnet_masked
    assert masked.numel == sum(p.numel() for p in (model.embed.weight, model.fc1.weight, model.fc1.bias))
    opt.add_param_group({"params": [model.norm.weight, model.norm.bias, model.fc2.weight, model.fc2.bias]})
    before = frozen_snapshot(model, mask)
    _train(model, opt)
    assert masked.numel == sum(p.numel() for p in model.parameters())  # the late group is counted too
    assert masked.n_trainable == mask.changed and masked.report()["trainable"] == mask.changed
    frozen, trainable = _moved(model, mask, before)
    assert frozen == 0 and trainable > 0
    assert not torch.equal(model.fc2.weight, before["fc2.weight"])  # the late group did train
    # A group with a parameter the model does not name cannot be masked: refused at the next step.
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(MaskMismatchError, match="added to the optimizer after the mask was attached, and the model the "
                       "mask was resolved against does not name them: they would train unmasked$"):
        _train(model, opt, steps=1)


def test_sgd_maximize_keeps_frozen_negative_zeros():
    model = Net()
    with torch.no_grad():
        model.fc1.weight[0, :4] = -0.0
        model.fc1.weight[1, :4] = 0.0
    t = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc1.weight"][:2, :4] = False
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    for opts in ({"maximize": True, "momentum": 0.9}, {"maximize": True}, {"maximize": False, "momentum": 0.9}):
        m = Net()
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=1e-2, **opts)
        MaskedOptimizer(opt, mask, m)  # exact mode: the first step is verified bit for bit, so it would raise
        _train(m, opt, steps=3)
        assert torch.signbit(m.fc1.weight[0, :4]).all() and not torch.signbit(m.fc1.weight[1, :4]).any(), opts


def test_weight_decay_is_restored_after_a_step_that_raised():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masked = MaskedOptimizer(opt, mask, model)

    def failing_closure():
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(failing_closure)
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)  # the next step restores the group's decay first, then masks it again
    assert _moved(model, mask, before)[0] == 0
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(failing_closure)
    masked.remove()
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)


def test_a_full_mask_warns_once():
    model = Net()
    full = Mask.full({n: p.shape for n, p in model.named_parameters()}, True, {"dtype": "bf16"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedOptimizer(torch.optim.AdamW(model.parameters()), full, model)
    assert [type(w.message) for w in caught] == [FullMaskWarning]


def test_frozen_master_check_counts_and_refuses_what_it_cannot_check():
    from rlsubnet.errors import MismatchError
    from rlsubnet.train import check_frozen_masters

    base = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]).bfloat16(), "b": torch.zeros(2).bfloat16()}
    master = {"a": torch.tensor([1.0, 2.5, 3.0, 4.0 + 2**-20]), "b": torch.zeros(2)}
    mask = Mask.from_bool({"a": torch.tensor([False, True, False, False]), "b": torch.zeros(2, dtype=torch.bool)})
    r = check_frozen_masters(mask, base, master)
    assert (r["frozen_entries_checked"], r["frozen_entries_moved"], r["moved_by_tensor"]) == (5, 1, {"a": 1})
    assert (r["trainable_entries"], r["trainable_entries_moved"]) == (1, 1)
    with pytest.raises(MismatchError, match="holds no tensor b of the mask"):
        check_frozen_masters(mask, base, {"a": master["a"]})


SAME_GRADIENT_OPTIMIZERS = {
    "adam-decoupled": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "adam-decoupled-single-tensor": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=False),
    "adam-decoupled-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, fused=True),
    "adam-decoupled-maximize-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adam-l2-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, maximize=True, foreach=False),
    "sgd-momentum-l2": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(SAME_GRADIENT_OPTIMIZERS))
def test_trainable_entries_move_exactly_as_in_an_unmasked_run(name):
    """Fed the same gradients for several steps, the masked optimizer's trainable entries follow a plain optimizer
    on a copy of the model bit for bit (its weight decay included: decoupled for AdamW and for Adam with
    ``decoupled_weight_decay``, L2 otherwise), and its frozen entries do not move at all. Every optimizer here
    is element-wise, so the frozen entries' zero gradients cannot change the trainable ones' updates."""
    masked_model, plain_model = Net(), Net()
    mask = _mask_for(masked_model)
    masked_opt = SAME_GRADIENT_OPTIMIZERS[name](masked_model.parameters())
    plain_opt = SAME_GRADIENT_OPTIMIZERS[name](plain_model.parameters())
    MaskedOptimizer(masked_opt, mask, masked_model, verify_steps=100)
    start = frozen_snapshot(masked_model, mask)
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        for (n, p), q in zip(masked_model.named_parameters(), plain_model.parameters()):
            grad = torch.randn(p.shape, generator=g) * 0.1
            p.grad, q.grad = grad.clone(), grad.clone()
        masked_opt.step()
        plain_opt.step()
    plain = dict(plain_model.named_parameters())
    for n, p in masked_model.named_parameters():
        t = mask.tensor(n)
        assert torch.equal(p.detach()[t].view(torch.int32), plain[n].detach()[t].view(torch.int32)), n
        assert torch.equal(p.detach()[~t].view(torch.int32), start[n][~t].view(torch.int32)), n
        if t.any():
            assert not torch.equal(p.detach()[t], start[n][t]), n  # the trainable entries did move


def _fixed_gradients(models, seed, skip=()):
    """The same random gradient on the same-named parameter of every model (None for names in ``skip``)."""
    g = torch.Generator().manual_seed(seed)
    named = [dict(m.named_parameters()) for m in models]
    for n, p in models[0].named_parameters():
        grad = torch.randn(p.shape, generator=g) * 0.1
        for ps in named:
            ps[n].grad = None if n in skip else grad.clone()


def test_a_parameter_without_gradient_gets_no_decay_either():
    """The optimizer skips a parameter whose gradient is None, decay included; the mask's own decay must too,
    or its trainable entries shrink where an unmasked run leaves them."""
    masked_model, plain_model = Net(), Net()
    mask = _mask_for(masked_model)
    masked_opt = torch.optim.AdamW(masked_model.parameters(), lr=1e-2, weight_decay=0.1)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    MaskedOptimizer(masked_opt, mask, masked_model, verify_steps=100)
    before = masked_model.fc1.weight.detach().clone()
    for step in range(3):
        _fixed_gradients([masked_model, plain_model], step, skip=("fc1.weight",))
        masked_opt.step()
        plain_opt.step()
    assert torch.equal(masked_model.fc1.weight.detach(), before)
    assert torch.equal(plain_model.fc1.weight.detach(), before)
    t = mask.tensor("fc2.weight")
    assert torch.equal(masked_model.fc2.weight.detach()[t], plain_model.fc2.weight.detach()[t])


def test_every_parameter_is_masked_whatever_comes_before_it():
    """Gradients of later parameters are masked even when an earlier one has no gradient, and decay is zeroed in
    a later group even when an earlier group has none (or nothing frozen); a tensor weight decay works too."""
    model = Net()
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc2.weight"][0] = False  # frozen entries only in the last group
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    opt = torch.optim.AdamW([
        {"params": [model.embed.weight, model.fc1.weight, model.fc1.bias], "weight_decay": 0.0},
        {"params": [model.norm.weight, model.norm.bias], "weight_decay": 0.1},  # nothing frozen here
        {"params": [model.fc2.weight, model.fc2.bias], "weight_decay": torch.tensor(0.1)},
    ], lr=1e-2)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=0)  # no safety net: the masking itself must hold
    before = frozen_snapshot(model, mask)
    for step in range(3):
        _fixed_gradients([model], step, skip=("embed.weight",))
        opt.step()
    assert _moved(model, mask, before)[0] == 0
    assert isinstance(opt.param_groups[2]["weight_decay"], torch.Tensor) and float(opt.param_groups[2]["weight_decay"]) == pytest.approx(0.1)
    assert masked.steps == 3


def test_a_loaded_state_is_cleaned_for_every_parameter():
    """The first parameter is fully trainable (nothing to clean): the frozen entries after it are cleaned still."""
    donor = Net()
    donor_opt = torch.optim.SGD(donor.parameters(), lr=0.1, momentum=0.9)
    _train(donor, donor_opt, steps=2)
    model = Net()
    t = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) < 0.5 for n, p in model.named_parameters()}
    t["embed.weight"][:] = True
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    MaskedOptimizer(opt, mask, model, verify_steps=0)
    opt.load_state_dict(donor_opt.state_dict())
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)
    assert _moved(model, mask, before)[0] == 0


def test_closure_by_keyword_and_the_handles_own_methods():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=0)
    before = frozen_snapshot(model, mask)
    x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))

    def closure():
        masked.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure=closure)  # keyword: the gradients the closure computes are masked too
    assert isinstance(loss, torch.Tensor)
    assert masked.step(closure) is not None  # the handle's step passes the closure on
    closure()
    assert masked.step() is None
    assert masked.steps == 3
    frozen, trainable = _moved(model, mask, before)
    assert frozen == 0 and trainable > 0
    masked.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # set_to_none by default, as torch's own
    closure()
    masked.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_sparse_gradients_are_refused_by_name():
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    MaskedOptimizer(opt, mask, model)
    model.embed.weight.grad = torch.zeros(11, 16).to_sparse()
    with pytest.raises(MaskError, match="^embed.weight: sparse gradients are not supported by the masked optimizer$"):
        opt.step()


def test_frozen_sign_and_nan_payloads_are_restored_bit_for_bit():
    """Strict mode compares bit patterns: an optimizer that turns a frozen -0.0 into +0.0 (equal as floats) or
    rewrites a NaN payload has moved it, and it is written back."""
    class SignFlipper(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.abs_()  # -0.0 -> +0.0, and a negative NaN loses its sign bit
            return None

    model = Net()
    with torch.no_grad():
        model.fc1.weight[0, :3] = -0.0
        model.fc1.weight[1, 0] = -float("nan")
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc1.weight"][:2] = False
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    opt = SignFlipper(model.parameters())
    masked = MaskedOptimizer(opt, mask, model)
    assert masked.strict
    negative = int(torch.signbit(model.fc1.weight[:2]).sum())  # what abs_() moves among the frozen entries
    assert negative >= 4
    for _ in range(2):
        opt.step()
        assert torch.signbit(model.fc1.weight[0, :3]).all() and torch.signbit(model.fc1.weight[1, 0])
    assert masked.restored_entries == 2 * negative  # counted over both steps


def test_report_of_a_known_setup():
    model = Net()
    mask = _mask_for(model)
    mask.meta["path"] = "m.safetensors"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=2)
    _train(model, opt, steps=3)
    numel = sum(p.numel() for p in model.parameters())
    assert masked.report() == {
        "optimizer": "AdamW",
        "mode": "exact (zero update)",
        "order": "clip the full gradient, then mask",
        "weight_decay": "applied inside the mask only",
        "mask": {"kind": "changed", "path": "m.safetensors", "atol": 1e-5, "dtype": "bf16",
                 "density": mask.changed / numel, "bits_sha256": mask.bits_sha256()},
        "numel": numel,
        "trainable": mask.changed,
        "density": mask.changed / numel,
        "fully_frozen_tensors": 2,
        "steps": 3,
        "verified_steps": 2,
        "restored_entries": 0,
        "buffers_in_mask": [],
    }
    assert masked.density == mask.changed / numel
    other = Net()
    strict = masking_module.mask_optimizer(torch.optim.RMSprop(other.parameters()), mask, other, mask_before_clip=True)
    r = strict.report()
    assert (r["optimizer"], r["mode"], r["order"], r["weight_decay"], r["verified_steps"]) == (
        "RMSprop", "strict (frozen entries restored after each step)", "mask, then clip",
        "optimizer's own; frozen entries restored", 0)


def test_trainable_mask_by_any_name_and_remove_twice():
    model = Net()
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc1.weight"][0] = False
    masked = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mask.from_bool(t), model)
    full = masked.trainable_mask("fc2.bias")  # nothing frozen there
    assert full.dtype == torch.bool and full.shape == model.fc2.bias.shape and bool(full.all())
    assert torch.equal(masked.trainable_mask("fc1.weight"), t["fc1.weight"])
    with pytest.raises(KeyError, match="nope"):
        masked.trainable_mask("nope")
    masked.remove()
    masked.remove()  # harmless
    assert not masked.attached


def test_frozen_changes_counts_each_side():
    model = Net()
    t = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc2.bias"][:4] = True
    mask = Mask.from_bool(t)
    before = frozen_snapshot(model, mask)
    with torch.no_grad():
        model.fc2.bias[:2] += 1  # 2 trainable entries
        model.fc2.bias[6:9] += 1  # 3 frozen entries
    assert frozen_changes(model, mask, before)["fc2.bias"] == (3, 2)
    assert frozen_changes(model, mask, before)["fc1.weight"] == (0, 0)


def test_wrapped_optimizers_and_compiled_models_are_looked_through():
    from rlsubnet.train.masking import unwrap_model, unwrap_optimizer

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:  # e.g. a trainer's own wrapper: anything with .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    class AcceleratedOptimizer(torch.optim.Optimizer):  # accelerate's is an Optimizer subclass that wraps one
        def __init__(self, inner):
            self.optimizer = inner

    nested = opt
    for _ in range(9):
        nested = Wrapper(nested)
    assert unwrap_optimizer(nested) is opt and unwrap_optimizer(AcceleratedOptimizer(Wrapper(opt))) is opt
    with pytest.raises(MaskError, match="^cannot mask Wrapper: not a torch.optim.Optimizer$"):
        unwrap_optimizer(Wrapper(nested))  # ten wrappers: refused rather than followed forever
    with pytest.raises(MaskError, match="^cannot mask str: not a torch.optim.Optimizer$"):
        unwrap_optimizer("adam")

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Compiled(model)) is model
    masked = MaskedOptimizer(Wrapper(opt), _mask_for(model), Compiled(model))
    assert masked.optimizer is opt and masked.n_trainable == _mask_for(model).changed


def test_mask_names_are_checked_against_parameters_and_buffers():
    class WithBuffer(Net):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(3))
            self.fixed = torch.nn.Parameter(torch.zeros(2), requires_grad=False)  # not trained, not in the mask

    model = WithBuffer()
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if n != "fixed"}
    t["fc1.weight"][0] = False
    t["scale"] = torch.ones(3, dtype=torch.bool)  # a mask built from a checkpoint also covers buffers
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    masked = MaskedOptimizer(opt, t, model)
    assert masked.buffers_in_mask == ["scale"] and masked.report()["buffers_in_mask"] == ["scale"]
    bad = {k: v for k, v in t.items() if k != "fc2.bias"}
    bad["extra.weight"] = torch.ones(2, dtype=torch.bool)
    m = Mask.from_bool(bad)
    m.meta["path"] = "m.safetensors"
    with pytest.raises(MaskMismatchError, match=r"^m.safetensors does not fit this model \(1 mask tensors the model does "
                       r"not have: extra.weight; 1 trainable parameters the mask does not cover: fc2.bias\)$"):
        MaskedOptimizer(torch.optim.SGD(model.fc1.parameters(), lr=0.1), m, model)
    with pytest.raises(MaskMismatchError, match="^the mask does not fit this model"):
        MaskedOptimizer(torch.optim.SGD(model.fc1.parameters(), lr=0.1), bad, model)


def _points_at_this_file(w) -> bool:
    """A warning's stacklevel makes it name the caller's line, here. Under `make mutate` mutmut's trampoline adds
    a frame between the caller and the library, so the check cannot hold there and is skipped."""
    return "MUTANT_UNDER_TEST" in os.environ or w.filename == __file__


def test_mask_level_checks_name_the_mask_and_point_at_the_caller():
    model = Net()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = Mask.full(shapes, False, {"kind": "changed"})
    empty.meta["path"] = "empty.safetensors"
    with pytest.raises(MaskError, match="^empty.safetensors has density 0: no parameter would train$"):
        MaskedOptimizer(opt, empty, model)
    MaskedOptimizer(opt, empty, model, allow_empty=True).remove()
    full = Mask.full(shapes, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedOptimizer(opt, full, model).remove()
    assert [str(w.message) for w in caught] == ["the mask has density 1: every parameter trains, nothing is restricted"]
    assert _points_at_this_file(caught[0])  # the warning names the line that attached the mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedOptimizer(opt, full, model, allow_full=True).remove()  # no dtype warning for kind "ones" either
        MaskedOptimizer(opt, {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}, model, allow_full=True).remove()
        MaskedOptimizer(opt, Mask.full(shapes, False), model, allow_empty=True).remove()  # kind "zeros"
    undated = _mask_for(model)
    undated.meta["dtype"] = None
    undated.meta["path"] = "old.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedOptimizer(opt, undated, model).remove()
    (w,) = caught
    assert str(w.message).startswith("old.safetensors was built with no recorded comparison mode, but this run will be "
                                     "compared in 'bf16': which entries count as changed depends on the mode")
    assert str(w.message).endswith("rebuild the mask with --mode bf16, or pass compare_mode=None if this is intended")
    assert _points_at_this_file(w)
    # a mask that is not full, covering only entries this optimizer trains in full: the run is not restricted
    t = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc2.weight"][:] = True
    t["fc2.bias"][:] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedOptimizer(torch.optim.SGD(model.fc2.parameters(), lr=0.1), t, model).remove()
    assert [str(w.message) for w in caught] == [
        "the mask selects all 363 entries this optimizer trains: the run is not restricted"]
    assert _points_at_this_file(caught[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedOptimizer(torch.optim.SGD(model.fc2.parameters(), lr=0.1), t, model, allow_full=True).remove()


def test_defaults_verify_one_step_and_clip_before_masking():
    model = Net()
    masked = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _mask_for(model), model)
    _train(model, masked.optimizer, steps=3)
    r = masked.report()
    assert (r["verified_steps"], r["order"], r["steps"]) == (1, "clip the full gradient, then mask", 3)


def test_strict_mode_checks_every_step_and_restores_a_fully_frozen_matrix_whole():
    """Strict mode compares every step (the report says so) and writes back a tensor that is frozen entirely, a
    matrix included (its snapshot is the whole tensor, not a masked selection)."""
    class Shifter(torch.optim.Optimizer):  # moves every entry, frozen or not
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1.0)
            return None

    model = Net()
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc1.weight"][:] = False
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    opt = Shifter(model.parameters())
    masked = MaskedOptimizer(opt, mask, model)
    frozen_before = model.fc1.weight.detach().clone()
    bias_before = model.fc1.bias.detach().clone()
    for _ in range(3):
        opt.step()
    assert torch.equal(model.fc1.weight.view(torch.int32), frozen_before.view(torch.int32))
    assert torch.equal(model.fc1.bias, bias_before + 3.0)
    r = masked.report()
    assert (r["steps"], r["verified_steps"], r["fully_frozen_tensors"]) == (3, 3, 1)
    assert r["restored_entries"] == 3 * 32 * 16


def test_a_loaded_adam_state_without_amsgrad_is_cleaned():
    """Adam without amsgrad keeps no max_exp_avg_sq: cleaning a loaded state skips the buffer it lacks and still
    zeroes the frozen entries of the others."""
    donor = Net()
    donor_opt = torch.optim.Adam(donor.parameters(), lr=1e-2)
    _train(donor, donor_opt, steps=2)
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=0)
    _train(model, opt, steps=1)
    masked.load_state_dict(donor_opt.state_dict())  # non-zero moments everywhere
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)
    assert _moved(model, mask, before)[0] == 0
    state = opt.state[model.fc1.weight]
    assert "max_exp_avg_sq" not in state
    frozen = ~mask.tensor("fc1.weight")
    assert not state["exp_avg"][frozen].any() and not state["exp_avg_sq"][frozen].any()


def test_a_group_added_after_a_load_keeps_the_loaded_state_due_for_cleaning():
    """Adding a parameter group between loading a state and the next step must not drop the pending cleaning."""
    def head_less(m):
        return [p for n, p in m.named_parameters() if not n.startswith("fc2.")]

    donor = Net()
    donor_opt = torch.optim.SGD(head_less(donor), lr=0.1, momentum=0.9)
    _train(donor, donor_opt, steps=2)
    model = Net()
    mask = _mask_for(model)
    opt = torch.optim.SGD(head_less(model), lr=0.1, momentum=0.9)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=0)
    _train(model, opt, steps=1)
    masked.load_state_dict(donor_opt.state_dict())  # non-zero momentum on frozen entries
    opt.add_param_group({"params": [model.fc2.weight, model.fc2.bias]})
    before = frozen_snapshot(model, mask)
    _train(model, opt, steps=2)
    assert _moved(model, mask, before)[0] == 0


def test_an_optimizer_without_a_maximize_option_gets_positive_zero_gradients():
    """Frozen gradients are +0 unless the group asks to maximize: a plain descent step then leaves a frozen -0.0
    as it is, so strict mode has nothing to restore."""
    class PlainSGD(torch.optim.Optimizer):  # no "maximize" in its groups
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
            return None

    model = Net()
    with torch.no_grad():
        model.fc1.weight[0, :3] = -0.0
    t = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    t["fc1.weight"][0] = False
    mask = Mask.from_bool(t, {"atol": 1e-5, "dtype": "bf16"})
    opt = PlainSGD(model.parameters(), lr=0.1)
    masked = MaskedOptimizer(opt, mask, model)
    assert masked.strict and "maximize" not in opt.param_groups[0]
    _train(model, opt, steps=2)
    assert torch.signbit(model.fc1.weight[0, :3]).all()
    assert masked.restored_entries == 0


def test_positional_arguments_after_the_closure_reach_the_optimizer():
    """The pre-hook wraps a positional closure and hands every later positional argument on unchanged."""
    class ScaledSGD(torch.optim.Optimizer):  # a step with an extra positional argument
        def __init__(self, params):
            super().__init__(params, {})
            self.seen = None

        @torch.no_grad()
        def step(self, closure=None, scale=1.0, *rest):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.seen = (scale, rest)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(scale * p.grad)
            return loss

    model = Net()
    mask = _mask_for(model)
    opt = ScaledSGD(model.parameters())
    masked = MaskedOptimizer(opt, mask, model)
    before = frozen_snapshot(model, mask)
    x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    assert opt.step(closure, 0.5, "extra") is not None
    assert opt.seen == (0.5, ("extra",))
    frozen, trainable = _moved(model, mask, before)
    assert frozen == 0 and trainable > 0 and masked.restored_entries == 0


@pytest.mark.parametrize("verify_steps,caught", [(2, False), (3, True)])
def test_exactly_the_first_verify_steps_steps_are_checked(monkeypatch, verify_steps, caught):
    """An optimizer that moves frozen entries only in its third step is caught when three steps are verified and
    not when two are: the check covers steps 1..verify_steps, no more."""
    class LateLeakySGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 3:
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1e-3)
            return None

    monkeypatch.setitem(masking_module.EXACT_STATE_KEYS, LateLeakySGD, ())
    model = Net()
    mask = _mask_for(model)
    opt = LateLeakySGD(model.parameters(), lr=0.1)
    masked = MaskedOptimizer(opt, mask, model, verify_steps=verify_steps)
    before = frozen_snapshot(model, mask)
    if caught:
        with pytest.raises(MaskError, match=r"^LateLeakySGD moved frozen entries in step 3 "):
            _train(model, opt, steps=3)
        assert _moved(model, mask, before)[0] == 0  # restored before raising
    else:
        _train(model, opt, steps=3)
        assert _moved(model, mask, before)[0] > 0  # an unchecked step: nothing looked
        assert masked.report()["verified_steps"] == 2


def test_options_are_checked_by_name():
    """An unknown keyword, an unknown comparison mode and the option's old name each answer in words naming the
    option; the old name sets the mode (no mode warning for an fp32 mask compared in fp32)."""
    from rlsubnet.errors import UsageError

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mask = _mask_for(model)
    with pytest.raises(TypeError, match=r"^unexpected keyword argument 'bogus'$"):
        MaskedOptimizer(opt, mask, model, bogus=1)
    with pytest.raises(UsageError, match=r"^unknown compare_mode 'fp8' \(choose from "):
        MaskedOptimizer(opt, mask, model, compare_mode="fp8")
    mask.meta["dtype"] = "fp32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedOptimizer(opt, mask, model, compare_dtype="fp32").remove()
    assert [(w.category, str(w.message)) for w in caught] == [(DeprecationWarning, "compare_dtype= is now compare_mode=")]
    assert _points_at_this_file(caught[0])
