"""The masked optimizer step: frozen entries bit-identical after real steps, the paper's order, weight decay
inside the mask, strict mode, and loud failures. Each guarantee has a control showing the failure it prevents."""

from __future__ import annotations

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
    with pytest.raises(MaskError, match="strict=True"):
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
    with pytest.raises(MaskError, match="moved frozen entries in step 1"):
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
    MaskedOptimizer(opt, mask, model)  # can attach again after removal


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
    with pytest.raises(MaskMismatchError, match="does not name"):
        MaskedOptimizer(opt3, good, model)
    MaskedOptimizer(opt, good, model)
    with pytest.raises(MaskError, match="already masked"):
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

    model = Tied()
    w = torch.rand(7, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # a checkpoint that stored both names: fine when they agree
    MaskedOptimizer(opt, {"embed_tokens.weight": w, "lm_head.weight": w.clone()}, model).remove()
    # one name is enough
    MaskedOptimizer(opt, {"lm_head.weight": w}, model).remove()
    with pytest.raises(MaskMismatchError, match="tied"):
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
    opt.add_param_group({"params": [model.norm.weight, model.norm.bias, model.fc2.weight, model.fc2.bias]})
    before = frozen_snapshot(model, mask)
    _train(model, opt)
    frozen, trainable = _moved(model, mask, before)
    assert frozen == 0 and trainable > 0
    assert not torch.equal(model.fc2.weight, before["fc2.weight"])  # the late group did train
    # A group with a parameter the model does not name cannot be masked: refused at the next step.
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(MaskMismatchError, match="added to the optimizer after the mask was attached"):
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
