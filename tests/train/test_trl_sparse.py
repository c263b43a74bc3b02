"""The sparse optimizer in TRL's GRPO, DPO and SFT trainers (attach_sparse): on fp32 weights it trains the same bits
as the dense MaskedOptimizer (attach_mask) around the same AdamW, with and without gradient accumulation, clips by
the full gradient's norm and logs that norm as grad_norm; bf16 weights keep their frozen entries."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from rlsubnet.errors import UsageError  # noqa: E402
from rlsubnet.masks import Mask, random_mask  # noqa: E402
from rlsubnet.train import SparseMaskedOptimizer, attach_mask, attach_sparse, sparse_optimizer_for  # noqa: E402

PROMPTS = [f"{a}+{b}=" for a in range(6) for b in range(6)]
ANSWERS = [str(eval(p[:-1])) for p in PROMPTS]
COMMON = dict(use_cpu=True, report_to="none", save_strategy="no", seed=0, gradient_checkpointing=False,
              disable_tqdm=True, logging_steps=1, learning_rate=1e-3, weight_decay=0.1, max_steps=2, bf16=False,
              max_grad_norm=0.5)


def count_ones(completions, **kwargs):
    return [float(c.count("1")) for c in completions]


def _mask(model):
    m = random_mask({n: tuple(p.shape) for n, p in model.named_parameters()}, density=0.3, seed=1)
    t = {n: m.tensor(n) for n in m.names()}
    t["model.norm.weight"][:] = False  # a tensor wholly outside; the layers' norms train in part, without decay
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"})


def _adamw(model):
    """The lab's optimizer: single-tensor AdamW, no decay on 1-D tensors."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, foreach=False)


def _trainer(algo, model, tok, tmp_path, ga=1, optimizer=None):
    kw = dict(output_dir=str(tmp_path / algo), per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga,
              **COMMON)
    opt = (optimizer, None)
    if algo == "grpo":
        args = GRPOConfig(num_generations=4, max_completion_length=3, **kw)
        return GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                           reward_funcs=count_ones, processing_class=tok, optimizers=opt)
    if algo == "dpo":
        ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": ANSWERS, "rejected": ["0"] * len(PROMPTS)})
        return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**kw), train_dataset=ds,
                          processing_class=tok, optimizers=opt)
    ds = Dataset.from_dict({"prompt": PROMPTS, "completion": ANSWERS})
    return SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok, optimizers=opt)


def _run(algo, state, tok, tiny_model, tmp_path, ga):
    model = tiny_model(tok)
    mask = _mask(model)
    trainer = _trainer(algo, model, tok, tmp_path, ga, _adamw(model))
    attach = attach_sparse if state == "sparse" else attach_mask
    cb = attach(trainer, mask, compare_mode=None)
    trainer.train()
    norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, cb, mask, trainer


@pytest.mark.parametrize("algo, ga", [("grpo", 2), ("dpo", 1), ("sft", 2)])
def test_sparse_equals_dense_masked_in_trl(algo, ga, tokenizer, tiny_model, tmp_path):
    dense, dense_norms, _, mask, _ = _run(algo, "dense", tokenizer, tiny_model, tmp_path, ga)
    sparse, sparse_norms, cb, _, trainer = _run(algo, "sparse", tokenizer, tiny_model, tmp_path, ga)
    assert {n: int((dense[n].view(torch.int32) != sparse[n].view(torch.int32)).sum()) for n in dense} == dict.fromkeys(
        dense, 0)
    initial = tiny_model(tokenizer)
    moved = sum(int((sparse[n] != p.detach()).sum()) for n, p in initial.named_parameters())
    assert moved > 0.5 * mask.changed  # training happened
    assert len(sparse_norms) == 2 and sparse_norms == dense_norms  # the full gradient's norm, logged the same
    assert max(sparse_norms) > 0.5  # above max_grad_norm: clipping was exercised
    r = cb.last_report
    assert r["steps"] == 2 and r["accumulation_steps"] == ga and r["max_grad_norm"] == 0.5
    assert trainer.args.max_grad_norm == 0.0  # the optimizer clips, the trainer does not


def test_bf16_weights_keep_frozen_entries(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer).to(torch.bfloat16)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer("sft", model, tokenizer, tmp_path, 1)  # no optimizer: built from the arguments
    cb = attach_sparse(trainer, mask, compare_mode=None)
    trainer.train()
    frozen = trained = 0
    for n, p in model.named_parameters():
        differs = p.detach().view(torch.int16) != before[n].view(torch.int16)
        frozen += int((differs & ~mask.tensor(n)).sum())
        trained += int((differs & mask.tensor(n)).sum())
    assert frozen == 0 and trained > 0.3 * mask.changed
    assert cb.last_report["masters"].startswith("fp32 masters")


def test_an_optimizer_passed_to_the_trainer(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    mask = _mask(model)
    probe = _trainer("sft", model, tokenizer, tmp_path, 1, _adamw(model))
    opt = sparse_optimizer_for(model, probe.args, mask, like=probe.optimizer, compare_mode=None)
    assert opt.max_grad_norm == 0.5 and opt.param_groups[0]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])  # the norms (1-D) would get no decay
    trainer = _trainer("sft", model, tokenizer, tmp_path, 1, opt)
    attach_sparse(trainer, opt)
    trainer.train()
    assert opt.steps == 2


def test_refusals(tokenizer, tiny_model, tmp_path):
    model = tiny_model(tokenizer)
    mask = _mask(model)
    trainer = _trainer("sft", model, tokenizer, tmp_path, 1, torch.optim.Adagrad(model.parameters()))
    with pytest.raises(UsageError, match=r"'Adagrad' is not supported with sparse optimizer state \(supported: adamw, adam, sgd\)"):
        attach_sparse(trainer, mask, compare_mode=None)
    opt = SparseMaskedOptimizer(model, mask, lr=1e-3, max_grad_norm=1.0, compare_mode=None)
    trainer = _trainer("sft", model, tokenizer, tmp_path, 2, opt)
    with pytest.raises(UsageError, match="trainer clips at max_grad_norm=0.5 but the sparse optimizer at 1.0"):
        attach_sparse(trainer, opt)
    trainer.args.max_grad_norm = 1.0
    with pytest.raises(UsageError, match="gradient_accumulation_steps=2 but .* accumulation_steps=1"):
        attach_sparse(trainer, opt)
