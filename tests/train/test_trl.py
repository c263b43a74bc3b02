"""Masked training through TRL's GRPO, DPO and SFT trainers (micro runs on a tiny Llama, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from rlsubnet.masks import Mask, MaskError, MaskMismatchError, random_mask  # noqa: E402
from rlsubnet.train import attach_mask, frozen_changes, frozen_snapshot, masked_trainer_class  # noqa: E402

PROMPTS = [f"{a}+{b}=" for a in range(6) for b in range(6)]
COMMON = dict(use_cpu=True, report_to="none", save_strategy="no", seed=0, gradient_checkpointing=False,
              disable_tqdm=True, logging_steps=1, learning_rate=1e-3, weight_decay=0.1, max_steps=4)


def count_ones(completions, **kwargs):
    return [float(c.count("1")) for c in completions]


def _mask(model, seed=1, density=0.3):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    m = random_mask(shapes, density=density, seed=seed)
    t = {n: m.tensor(n) for n in m.names()}
    for n in t:
        if "norm" in n:
            t[n][:] = False  # fully frozen tensors, as in RL masks
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"})


def _grpo(model, tok, tmp_path, **over):
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=3, bf16=True, **{**COMMON, **over})
    return GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                       reward_funcs=count_ones, processing_class=tok)


def _check(model, mask, before, cb, steps):
    ch = frozen_changes(model, mask, before)
    frozen_moved = sum(f for f, _ in ch.values())
    trainable_moved = sum(t for _, t in ch.values())
    assert frozen_moved == 0  # fp32 master weights outside the mask: bit-identical
    assert trainable_moved > 0.5 * mask.changed  # inside the mask, training happened
    assert cb.last_report["steps"] == steps and cb.last_report["restored_entries"] == 0


def test_grpo_micro_run_with_a_mask(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    mask = _mask(model)
    trainer = _grpo(model, tokenizer, tmp_path)
    cb = attach_mask(trainer, mask)
    before = frozen_snapshot(model, mask)
    trainer.train()
    _check(model, mask, before, cb, 4)
    assert cb.last_report["order"] == "clip the full gradient, then mask"
    assert cb.masked is None  # detached at the end of training


def test_dpo_micro_run_with_a_mask_file(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    path = _mask(model).save(tmp_path / "m.safetensors")
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": [str(eval(p[:-1])) for p in PROMPTS], "rejected": ["0"] * len(PROMPTS)})
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=8, bf16=True, **COMMON)
    Masked = masked_trainer_class(DPOTrainer)
    trainer = Masked(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tokenizer,
                     mask=str(path), mask_options={"mask_before_clip": True})
    mask = Mask.load(path)
    before = frozen_snapshot(model, mask)
    trainer.train()
    _check(model, mask, before, trainer.mask_callback, 4)
    assert trainer.mask_callback.last_report["order"] == "mask, then clip"


def test_mask_before_clip_changes_what_the_clipping_sees(tokenizer, tiny_model, tmp_path):
    """The trainer logs the norm its clipping measured. Masked first, that is the subnetwork's gradient norm:
    smaller than the full gradient's, which the paper's order (clip, then mask) clips. Same model, data, step."""
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": [str(eval(p[:-1])) for p in PROMPTS], "rejected": ["0"] * len(PROMPTS)})
    norms = {}
    for before_clip in (False, True):
        model = tiny_model(tokenizer)
        args = DPOConfig(output_dir=str(tmp_path / f"dpo{before_clip}"), per_device_train_batch_size=8, bf16=True,
                         **{**COMMON, "max_steps": 1})
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tokenizer)
        mask = _mask(model, density=0.1)
        attach_mask(trainer, mask, mask_before_clip=before_clip)
        trainer.train()
        norms[before_clip] = next(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h)
    assert 0 < norms[True] < 0.8 * norms[False], norms


def _sft(model, tok, tmp_path, **over):
    ds = Dataset.from_dict({"prompt": PROMPTS, "completion": [str(eval(p[:-1])) for p in PROMPTS]})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, bf16=True, **{**COMMON, **over})
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def test_sft_micro_run_with_a_mask(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    mask = _mask(model)
    trainer = _sft(model, tokenizer, tmp_path)
    cb = attach_mask(trainer, mask)
    before = frozen_snapshot(model, mask)
    trainer.train()
    _check(model, mask, before, cb, 4)


def test_a_full_mask_changes_nothing_about_the_run(tokenizer, tiny_model, tmp_path):
    """Same seed and data order: a density-1 mask reproduces the unmasked GRPO run bit for bit, generations
    included (the plug-in draws no random numbers and changes no setting)."""
    runs = []
    for use_mask in (False, True):
        model = tiny_model(tokenizer)
        trainer = _grpo(model, tokenizer, tmp_path / str(use_mask), max_steps=3)
        if use_mask:
            full = Mask.full({n: p.shape for n, p in model.named_parameters()}, True, {"dtype": "bf16"})
            attach_mask(trainer, full, allow_full=True)
        trainer.train()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], tiny_model(tokenizer).state_dict()[n]) for n in runs[0])


def test_a_mask_that_does_not_fit_fails_before_the_first_step(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    bad = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if "layers.1." not in n}
    trainer = _sft(model, tokenizer, tmp_path)
    attach_mask(trainer, bad, allow_full=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MaskMismatchError, match="does not cover"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # not one step ran
    with pytest.raises(MaskError, match="already has a mask"):
        attach_mask(trainer, bad)
