"""Finetune any Hugging Face causal LM with TRL's GRPO, DPO or SFT trainer, optionally on a mask only: what
``rlsubnet train {grpo,dpo,sft} --model DIR`` runs.

The output folder is built under a temporary name and renamed at the end (complete or absent):

    model/       the trained model, a Hugging Face folder in the input's dtype, with its tokenizer
    train.json   the run's record: inputs (model, dataset digest, reward), settings, optimizer report, the
                 bit-for-bit check of the frozen entries, the trainer's first and last metrics, versions
    log.jsonl    the trainer's logs, one line per step

Optimizer state (``optimizer_state``):

- ``"sparse"``: :class:`~rlsubnet.train.SparseMaskedOptimizer` through :func:`~rlsubnet.train.attach_sparse`. The
  weights stay in their stored dtype (bf16 stays bf16, and the forward runs on it); fp32 masters and moments
  are kept for the mask's entries only, and frozen entries are never written. Without a mask every entry
  trains (fp32 masters of every entry: mixed precision).
- ``"dense"``: the model is trained in fp32 (masters for every entry, the forward on them) by any torch
  optimizer, restricted by :class:`~rlsubnet.train.MaskedOptimizer` when a mask is given, and saved rounded to
  the stored dtype. On an fp32 model both give bit-identical weights; on a bf16 model they differ by the
  forward's precision (docs/masks-and-training.md).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_dir, atomic_write_text
from rlsubnet.lab.config import StageSpec
from rlsubnet.masks.mask import Mask, MaskError
from rlsubnet.train.inputs import check_model_folder, load_tokenizer_of
from rlsubnet.train.sparse_rules import SUPPORTED, optimizer_kind

OPTIMIZER_STATES = ("sparse", "dense")


def torch_optimizer_class(name: str, optimizer_state: str) -> type:
    """The torch optimizer ``--optim NAME`` names; with sparse state only those it supports."""
    if optimizer_state == "sparse":
        try:
            kind = optimizer_kind(name)
        except UsageError:
            raise UsageError(
                f"--optim {name!r} is not supported with --optimizer-state sparse (supported: {', '.join(SUPPORTED)}); "
                "pass --optimizer-state dense to train it with dense state"
            ) from None
        return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    names = {
        n.lower(): getattr(torch.optim, n)
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
    }
    names.pop("optimizer", None)
    if name.lower() not in names:
        raise UsageError(f"--optim {name!r}: not a torch.optim optimizer (choose from {', '.join(sorted(names))})")
    return names[name.lower()]


def make_optimizer(model, cls: type, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """``cls`` over the model's trainable parameters; no weight decay on 1-D tensors (norms, biases), the
    single-tensor code path where the optimizer has one (the arithmetic the sparse optimizer reproduces)."""
    import inspect

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        g
        for g in (
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        )
        if g["params"]
    ]
    accepted = inspect.signature(cls).parameters
    kw: dict[str, Any] = {"lr": lr}
    for key, value in (("foreach", False), ("fused", False), ("momentum", momentum)):
        if key in accepted:
            kw[key] = value
    if "weight_decay" not in accepted:
        for g in groups:
            g.pop("weight_decay")
    return cls(groups, **kw)


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the folder's config says its weights are stored in (fp32 when it says nothing)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"--model {model_dir}: config.json names dtype {name!r}, not a floating-point dtype")
    return dtype


def load_causal_lm(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {model_dir}: does not load as a causal LM ({type(exc).__name__}: {exc})") from None
    return model


def frozen_check(model, mask: Mask, model_dir: Path) -> dict:
    """Entries outside ``mask`` whose trained value differs, bit for bit, from the input checkpoint's."""
    from rlsubnet.checkpoint import open_checkpoint
    from rlsubnet.train.masking import unwrap_model

    ck = open_checkpoint(model_dir, label="the input model")
    checked = moved = trained_moved = 0
    per_tensor: dict[str, int] = {}
    try:
        for name, p in unwrap_model(model).named_parameters(remove_duplicate=False):
            if name not in mask or name not in ck.infos:
                continue
            before = ck.read(name).to(torch.float32)
            differs = p.detach().to(torch.float32).view(torch.int32) != before.view(torch.int32)
            trains = mask.tensor(name, device=p.device)
            n = int((differs & ~trains).sum())
            checked += int((~trains).sum())
            moved += n
            trained_moved += int((differs & trains).sum())
            if n:
                per_tensor[name] = n
    finally:
        ck.close()
    return {
        "frozen_entries_checked": checked,
        "frozen_entries_moved": moved,
        "moved_by_tensor": per_tensor,
        "trainable_entries_moved": trained_moved,
    }


def training_arguments(spec: StageSpec, output_dir: Path, *, grad_accum: int, max_length: int, max_completion: int):
    """TRL's config for ``spec.algorithm``: the run's settings, offline, no reporting, TRL's defaults otherwise."""
    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=spec.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        gradient_accumulation_steps=grad_accum,
        seed=spec.seed,
        data_seed=spec.effective_data_seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    if spec.algorithm == "grpo":
        from trl import GRPOConfig

        return GRPOConfig(
            **common,
            per_device_train_batch_size=spec.batch_size * spec.num_generations,  # counts completions
            num_generations=spec.num_generations,
            max_completion_length=max_completion,
            beta=spec.resolved_beta,
            use_vllm=False,
            log_completions=False,
        )
    if spec.algorithm == "dpo":
        from trl import DPOConfig

        return DPOConfig(
            **common, per_device_train_batch_size=spec.batch_size, beta=spec.resolved_beta, max_length=max_length
        )
    from trl import SFTConfig

    return SFTConfig(**common, per_device_train_batch_size=spec.batch_size, max_length=max_length, packing=False)


def finetune(
    spec: StageSpec,
    *,
    model_dir: str | Path,
    out_dir: str | Path,
    rows: Sequence[dict],
    data_record: dict,
    reward: Callable | None = None,
    reward_spec: str | None = None,
    mask: Mask | None = None,
    mask_options: dict | None = None,
    optimizer_state: str = "sparse",
    optim: str = "adamw",
    momentum: float = 0.0,
    grad_accum: int = 1,
    max_length: int = 512,
    max_completion_length: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``model_dir`` on ``rows`` with ``spec``'s trainer and settings; write ``out_dir``; return the record.

    ``mask_options``: ``mask_before_clip``, ``compare_mode``, ``allow_full`` (and ``strict``, dense state only).
    Everything that can be refused is checked before the first step, and nothing is left in ``out_dir`` when a
    run fails.
    """
    from rlsubnet.lab.progress import StageProgress
    from rlsubnet.lab.stages import _train_summary, library_versions, quiet_libraries

    if optimizer_state not in OPTIMIZER_STATES:
        raise UsageError(f"unknown --optimizer-state {optimizer_state!r} (choose from {', '.join(OPTIMIZER_STATES)})")
    options = dict(mask_options or {})
    if optimizer_state == "sparse" and options.pop("strict", None):
        raise UsageError("--strict applies to --optimizer-state dense (sparse state never writes a frozen entry)")
    if spec.algorithm == "grpo" and reward is None:
        raise UsageError("train grpo needs --reward MODULE:FUNCTION")
    opt_cls = torch_optimizer_class(optim, optimizer_state)
    model_dir = check_model_folder(model_dir)
    quiet_libraries()
    t0 = time.monotonic()
    tokenizer = load_tokenizer_of(model_dir)
    dtype = stored_dtype(model_dir)
    model = load_causal_lm(model_dir, dtype if optimizer_state == "sparse" else torch.float32)
    if mask is not None:
        from rlsubnet.train.masking import resolve_parameter_masks

        if mask.changed == 0:
            raise MaskError(f"{mask.meta.get('path') or 'the mask'} has density 0: no parameter would train")
        resolve_parameter_masks(mask, model)  # names and shapes, listed by kind, before anything else is built
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        trainer = _build_trainer(
            spec,
            model,
            tokenizer,
            rows,
            reward,
            model_dir,
            tmp,
            grad_accum,
            max_length,
            max_completion_length,
            opt_cls,
            momentum,
        )
        attached = _attach(trainer, model, mask, optimizer_state, options)
        bar = StageProgress(spec.name, spec.steps, enabled=progress)
        logs = _LogCollector(bar)
        trainer.add_callback(logs)
        t_train = time.monotonic()
        try:
            trainer.train()
        finally:
            bar.close()
        train_seconds = time.monotonic() - t_train
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        report = getattr(attached, "last_report", None)
        check = frozen_check(model, mask, model_dir) if mask is not None else None
        if optimizer_state == "dense":
            model.to(dtype)  # the masters, rounded to the stored dtype
        model.save_pretrained(str(tmp / "model"))
        tokenizer.save_pretrained(str(tmp / "model"))
        record: dict[str, Any] = {
            "kind": "finetune",
            "algorithm": spec.algorithm,
            "model": {
                "dir": str(model_dir),
                "class": type(model).__name__,
                "dtype": str(dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            "dataset": data_record,
            "reward": reward_spec,
            "settings": {
                **spec.to_json(),
                "gradient_accumulation_steps": grad_accum,
                "optim": optim,
                "momentum": momentum,
                "max_length": max_length,
                "max_completion_length": max_completion_length,
            },
            "optimizer_state": optimizer_state,
            "optimizer": report,
            "mask": _mask_record(mask, options),
            "check": check,
            "steps_done": trainer.state.global_step,
            "train_summary": _train_summary(logs.logs),
            "timings": {"train_s": train_seconds, "total_s": time.monotonic() - t0},
            "versions": library_versions(),
        }
        atomic_write_text(tmp / "train.json", json.dumps(record, indent=2, default=str) + "\n")
        atomic_write_text(tmp / "log.jsonl", "".join(json.dumps(r) + "\n" for r in logs.logs))
        if check is not None and check["frozen_entries_moved"]:
            raise MaskError(
                f"{check['frozen_entries_moved']} entries outside the mask moved "
                f"({', '.join(check['moved_by_tensor'])}): nothing written"
            )
    return record


def _mask_record(mask: Mask | None, options: dict) -> dict | None:
    if mask is None:
        return None
    return {
        "path": mask.meta.get("path"),
        "kind": mask.kind,
        "atol": mask.atol,
        "dtype": mask.mode,
        "density": mask.density,
        "bits_sha256": mask.bits_sha256(),
        "options": options,
    }


def _build_trainer(
    spec, model, tokenizer, rows, reward, model_dir, tmp, grad_accum, max_length, max_completion, opt_cls, momentum
):
    from datasets import Dataset

    from rlsubnet.lab.trainers import make_trainer

    args = training_arguments(
        spec, tmp / "trainer", grad_accum=grad_accum, max_length=max_length, max_completion=max_completion
    )
    extra: dict[str, Any] = {}
    if spec.algorithm == "grpo":
        extra["reward_funcs"] = [reward]
    elif spec.algorithm == "dpo":
        extra["ref_model"] = load_causal_lm(model_dir, next(model.parameters()).dtype)
    optimizer = make_optimizer(model, opt_cls, spec.learning_rate, spec.weight_decay, momentum)
    trainer_cls = _trainer_class(spec.algorithm)
    return make_trainer(trainer_cls, model, args, Dataset.from_list(list(rows)), tokenizer, (), optimizer, **extra)


def _trainer_class(algorithm: str) -> type:
    import trl

    return {"grpo": trl.GRPOTrainer, "dpo": trl.DPOTrainer, "sft": trl.SFTTrainer}[algorithm]


def _attach(trainer, model, mask: Mask | None, optimizer_state: str, options: dict):
    from rlsubnet.train import attach_mask, attach_sparse

    if optimizer_state == "sparse":
        if mask is None:  # every entry trains: fp32 masters for all, the weights in their own dtype
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
            mask = Mask.full(shapes, True)
            options = {**options, "allow_full": True, "compare_mode": None}
        return attach_sparse(trainer, mask, **options)
    if mask is not None:
        return attach_mask(trainer, mask, **options)
    return None


class _LogCollector(TrainerCallback):
    """The trainer's logs, and the progress bar."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.logs: list[dict] = []
        self._last: dict = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
            self.logs.append(rec)
            self._last = rec

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(state.global_step, self._last)
