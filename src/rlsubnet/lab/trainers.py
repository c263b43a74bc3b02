"""TRL's trainers as every lab run configures them: explicit arguments, the same optimizer, no printers.

The train extra (transformers, trl, datasets) is imported where a trainer is built: it takes seconds, and
`rlsubnet --help` and the library's own commands never need it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlsubnet.errors import UsageError
from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.data import sft_features
from rlsubnet.lab.model import load_model
from rlsubnet.lab.rewards import exact_match_reward
from rlsubnet.lab.tasks import get_task

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments


def default_optimizer(model, args):
    """The optimizer of every stage: torch AdamW (single-tensor path) with the TrainingArguments' settings.

    Made here, not by the Trainer, so that a masked re-run can wrap exactly the same optimizer (the Trainer's
    default on torch ≥ 2.8 is the fused kernel, whose rounding differs). Norms and biases get no weight decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        foreach=False,
        fused=False,
    )


def sgd_optimizer(model, args):
    """Plain SGD (no momentum, no Nesterov) with the TrainingArguments' learning rate and weight decay (norms and
    biases get none), single-tensor path like :func:`default_optimizer`."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=0.0, foreach=False)


def stage_optimizer(spec: StageSpec):
    """The optimizer factory ``(model, args) -> Optimizer`` of ``spec``: :func:`sgd_optimizer` or
    :func:`default_optimizer`."""
    return sgd_optimizer if spec.optimizer == "sgd" else default_optimizer


def common_args(
    output_dir: str,
    *,
    learning_rate: float,
    steps: int,
    seed: int,
    max_grad_norm: float,
    weight_decay: float,
    lr_scheduler_type: str = "constant",
    warmup_steps: int = 0,
) -> dict:
    """TrainingArguments every stage sets explicitly: TRL's defaults (bf16 autocast, gradient checkpointing,
    lr 1e-6, fused AdamW, tqdm, reporting) would otherwise decide the result or the output."""
    schedule = dict(
        max_steps=steps, learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps
    )
    optim = dict(
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8
    )
    # fp32 on the CPU, one batch per optimizer step, the rows in the order given (already the stage's data order)
    numerics = dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, gradient_accumulation_steps=1)
    order = dict(seed=seed, data_seed=seed, dataloader_num_workers=0, train_sampling_strategy="sequential")
    # the stage writes its own outputs and shows its own progress
    quiet = dict(report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True)
    return dict(output_dir=output_dir, **schedule, **optim, **numerics, **order, **quiet)


def sft_settings(batch_size: int) -> dict:
    """SFTConfig settings of every SFT run (stages and pretraining): the rows come tokenised, in the run's order."""
    return dict(
        per_device_train_batch_size=batch_size,
        max_length=None,
        shuffle_dataset=False,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )


def make_trainer(trainer_cls, model, args, dataset, tokenizer, callbacks: Sequence, optimizer, **extra) -> Trainer:
    """``trainer_cls`` on ``optimizer``, without the library's own printers (the lab shows its own progress)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        optimizers=(optimizer, None),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def train_timed(trainer, trainer_dir: Path, bar) -> float:
    """Train; the wall seconds it took. The progress ``bar`` closes either way; the trainer's scratch folder
    ``trainer_dir`` is removed once training has finished."""
    t_train = time.monotonic()
    try:
        trainer.train()
    finally:
        train_seconds = time.monotonic() - t_train
        bar.close()
    shutil.rmtree(trainer_dir, ignore_errors=True)
    return train_seconds


def _loss_type(spec: StageSpec) -> str:
    loss_type = spec.resolved_loss_type
    if loss_type is None:
        raise UsageError(f"stage {spec.name}: {spec.algorithm} has no loss type")
    return loss_type


def build_trainer(
    spec: StageSpec,
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    base_dir: Path,
    output_dir: Path,
    callbacks: Sequence = (),
    optimizer_factory: Callable | None = None,
) -> Trainer:
    """The TRL trainer of a stage, configured explicitly (no library default left to decide the result)."""
    from datasets import Dataset

    task = get_task(spec.task)
    base = common_args(
        str(output_dir),
        learning_rate=spec.learning_rate,
        steps=spec.steps,
        seed=spec.seed,
        max_grad_norm=spec.max_grad_norm,
        weight_decay=spec.weight_decay,
    )
    args: TrainingArguments
    extra: dict[str, Any] = {}
    if spec.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **base,
            per_device_train_batch_size=spec.batch_size * spec.num_generations,  # counts completions
            num_generations=spec.num_generations,
            max_completion_length=task.max_answer_chars + 1,  # the answer and <eos>
            beta=spec.resolved_beta,
            loss_type=_loss_type(spec),
            scale_rewards="group",
            num_iterations=1,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            shuffle_dataset=False,
            use_vllm=False,
            disable_dropout=True,
            log_completions=False,
        )
        dataset = Dataset.from_list(list(rows))
        trainer_cls: type = GRPOTrainer
        extra["reward_funcs"] = [exact_match_reward]
    elif spec.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **base,
            per_device_train_batch_size=spec.batch_size,
            beta=spec.resolved_beta,
            loss_type=[_loss_type(spec)],
            max_length=64,
            precompute_ref_log_probs=False,
            disable_dropout=True,
        )
        dataset = Dataset.from_list(list(rows))
        trainer_cls = DPOTrainer
        extra["ref_model"] = load_model(base_dir)
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**base, **sft_settings(spec.batch_size))
        dataset = Dataset.from_dict(sft_features(rows, tokenizer))
        trainer_cls = SFTTrainer
    if optimizer_factory is not None and spec.optimizer != "adamw":
        raise UsageError(
            f"stage {spec.name}: a custom optimizer factory wraps AdamW; --optimizer {spec.optimizer} has none"
        )
    optimizer = (optimizer_factory or stage_optimizer(spec))(model, args)
    return make_trainer(trainer_cls, model, args, dataset, tokenizer, callbacks, optimizer, **extra)
