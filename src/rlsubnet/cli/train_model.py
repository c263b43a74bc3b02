"""``rlsubnet train {grpo,dpo,sft} --model DIR``: any Hugging Face causal LM (:func:`rlsubnet.train.finetune`).

Every input is checked before the model is loaded, in the order a user fixes them: options, the mask file, the
dataset, the reward function, the model folder and its tokenizer; then the mask against the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rlsubnet.cli.config_args import from_args
from rlsubnet.errors import UsageError
from rlsubnet.lab.config import StageSpec


def run_model(cfg, args: argparse.Namespace) -> int:
    try:
        from rlsubnet.lab.data import stage_rows
        from rlsubnet.masks import Mask
        from rlsubnet.train.finetune import finetune, torch_optimizer_class
        from rlsubnet.train.inputs import check_model_folder, load_dataset_rows, load_reward
    except ImportError as exc:  # the train extra (transformers, trl, datasets) is missing
        raise UsageError(f"`rlsubnet train` needs the train extra (pip install 'rlsubnet[train]'): {exc}") from None

    algorithm = args.algorithm
    lab_only = [flag for flag, v in (("--samples", cfg.samples), ("--eval-task", cfg.eval_task)) if v]
    if lab_only:
        raise UsageError(f"{lab_only[0]} applies to a lab stage (--base), not to --model")
    if cfg.dataset and args.task_given:
        raise UsageError("--dataset and --task both name the training rows: give one")
    if cfg.reward and algorithm != "grpo":
        raise UsageError(f"--reward applies to grpo (train {algorithm} has no reward function)")
    if cfg.dataset is None and algorithm == "dpo":
        raise UsageError("train dpo --model needs --dataset JSONL with prompt, chosen and rejected columns")
    if cfg.dataset is not None and algorithm == "grpo" and not cfg.reward:
        raise UsageError("train grpo --dataset needs --reward MODULE:FUNCTION")
    name = cfg.name or (f"{algorithm}-sub" if cfg.mask else algorithm)
    spec = from_args(StageSpec, args, name=name)
    torch_optimizer_class(cfg.optim, cfg.optimizer_state)
    if cfg.strict and cfg.optimizer_state == "sparse":
        raise UsageError("--strict applies to --optimizer-state dense (sparse state never writes a frozen entry)")
    mask = Mask.load(cfg.mask) if cfg.mask else None

    if cfg.dataset is not None:
        rows, data_record = load_dataset_rows(cfg.dataset, algorithm)
    else:
        if spec.uses_own_samples:
            raise UsageError(f"--data {spec.data} comes from a lab θ0's samples: pass --dataset JSONL instead")
        rows, data_record = stage_rows(spec)
        data_record = {"task": spec.task, **data_record}
    reward, reward_spec = None, cfg.reward
    if algorithm == "grpo":
        if cfg.reward:
            reward = load_reward(cfg.reward, data_record.get("columns") or sorted(rows[0]))
        else:
            from rlsubnet.lab.rewards import exact_match_reward

            reward, reward_spec = exact_match_reward, "rlsubnet.lab.rewards:exact_match_reward"
    check_model_folder(cfg.model)

    options: dict[str, Any] = {
        "mask_before_clip": cfg.mask_before_clip,
        "compare_mode": cfg.compare_mode,
        "allow_full": cfg.allow_full,
    }
    if cfg.optimizer_state == "dense":
        options["strict"] = True if cfg.strict else None
    record = finetune(
        spec,
        model_dir=cfg.model,
        out_dir=cfg.out,
        rows=rows,
        data_record=data_record,
        reward=reward,
        reward_spec=reward_spec,
        mask=mask,
        mask_options=options,
        optimizer_state=cfg.optimizer_state,
        optim=cfg.optim,
        momentum=cfg.momentum or 0.0,
        grad_accum=cfg.gradient_accumulation_steps or 1,
        max_length=cfg.max_length or 512,
        max_completion_length=cfg.max_completion_length or 64,
        overwrite=cfg.overwrite,
        progress=not cfg.quiet,
    )
    if cfg.json:
        json.dump(record, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    summary = record["train_summary"]
    loss = summary.get("loss") or summary.get("reward") or {}
    print(
        f"wrote {cfg.out}/model and {cfg.out}/train.json: {algorithm.upper()} on {data_record['rows']:,} rows, "
        f"{record['steps_done']} steps, {record['optimizer_state']} optimizer state"
        + (f"; loss {loss['first']:.4g} -> {loss['last']:.4g}" if "loss" in summary else "")
    )
    opt = record["optimizer"] or {}
    if "state_bytes" in opt:
        print(
            f"  trained {opt['trainable']:,} of {opt['numel']:,} entries (density {opt['density']:.4f}); "
            f"optimizer state {opt['state_bytes']:,} bytes; {opt['order']}"
        )
    c = record["check"]
    if c is not None:
        print(
            f"  outside the mask: {c['frozen_entries_moved']} of {c['frozen_entries_checked']:,} entries moved "
            "(bitwise against the input model)"
        )
    return 0
