"""``rlsubnet train {grpo,dpo,sft}``: finetune any Hugging Face causal LM, or a lab model, with TRL, optionally
restricted to a mask.

    rlsubnet train grpo --model my-model/ --dataset prompts.jsonl --reward my_rewards:exact --mask grpo.mask.safetensors --lr 1e-6 --steps 100 --out runs/grpo-sub
    rlsubnet train dpo  --model my-model/ --dataset pairs.jsonl --out runs/dpo
    rlsubnet train grpo --base runs/demo/stages/pretrain/model --mask runs/demo/masks/grpo.mask.safetensors --lr 1e-6 --steps 100 --out runs/grpo-sub

--model DIR: any causal-LM folder with its tokenizer; --dataset FILE.jsonl with the columns TRL reads (grpo:
prompt, and any columns the reward takes; dpo: prompt, chosen, rejected; sft: prompt, completion), or without
--dataset the training split of a lab --task. Writes OUT/model (a Hugging Face folder, in the input's dtype),
OUT/train.json (the run's record, with the bit-for-bit check of the frozen entries) and OUT/log.jsonl.

--base DIR: a lab stage (:func:`rlsubnet.lab.stages.run_stage`): the same spec (seed, data seed, learning rate,
steps...) gives the same rows in the same order and the same sampling, so a masked re-run differs from the full
run only by the mask; the fp32 masters outside the mask are checked against θ0 in OUT/mask.json.

With --mask only the mask's entries train (clip the full gradient, then mask; weight decay inside the mask).
--optimizer-state sparse (the default) keeps optimizer state for those entries only and leaves the weights in
their stored dtype; dense keeps fp32 state for every entry (any torch optimizer, --optim).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsubnet import limits
from rlsubnet.cli.config_args import add_dataclass_arguments, from_args
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_write_text, output_lock
from rlsubnet.lab.config import StageSpec, check_choices, option
from rlsubnet.lab.tasks import TASKS

STAGE = "stage"
MODEL = "any model (--model)"
LAB = "lab model (--base)"


@dataclass(frozen=True)
class TrainConfig:
    """What ``rlsubnet train`` needs beyond the stage's own settings (:class:`rlsubnet.lab.config.StageSpec`)."""

    out: str = field(metadata={"help": "output folder (model/, train.json or stage.json...)", "metavar": "DIR"})
    model: str | None = field(
        default=None,
        metadata={"help": "any Hugging Face causal-LM folder with its tokenizer", "metavar": "DIR", "group": MODEL},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "training rows, one JSON object a line: prompt (grpo); prompt, chosen, rejected (dpo); prompt, "
            "completion (sft)",
            "metavar": "JSONL",
            "default_help": "the training split of --task",
            "group": MODEL,
        },
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "grpo: the reward function, MODULE:FUNCTION (a module name or a .py file) with TRL's signature "
            "f(completions, **kwargs) -> list[float]",
            "metavar": "MODULE:FUNCTION",
            "default_help": "exact match with --task's answers; required with --dataset",
            "group": MODEL,
        },
    )
    optim: str = field(
        default="adamw",
        metadata={"help": "torch optimizer (sparse state: adamw, adam, sgd; dense: any torch.optim)", "group": MODEL},
    )
    momentum: float | None = field(default=None, metadata={"help": "SGD momentum", "default_help": "0", "group": MODEL})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "micro-batches per optimizer step",
            "aliases": ("--grad-accum",),
            "default_help": "1",
            "group": MODEL,
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "dpo, sft: truncate sequences to this many tokens", "default_help": "512", "group": MODEL},
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "grpo: tokens generated per completion", "default_help": "64", "group": MODEL}
    )
    base: str | None = field(
        default=None,
        metadata={
            "help": "θ0 of a lab stage: a lab model folder (bf16 weights, config, tokenizer)",
            "metavar": "DIR",
            "group": LAB,
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    mask: str | None = field(
        default=None,
        metadata={
            "help": "train only this mask's entries (a file from `rlsubnet mask`)",
            "metavar": "FILE",
            "group": "mask",
        },
    )
    optimizer_state: str = field(
        default="sparse",
        metadata={
            "help": "sparse: optimizer state (fp32 masters, moments) for the trained entries only, weights in their "
            "stored dtype; dense: fp32 state for every entry",
            "choices": ("sparse", "dense"),
            "group": "mask",
        },
    )
    mask_before_clip: bool = field(
        default=False,
        metadata={
            "help": "mask the gradient before clipping (default: clip the full gradient, then mask, as the paper)",
            "group": "mask",
        },
    )
    strict: bool = field(
        default=False,
        metadata={"help": "dense state: also restore frozen entries after every step", "group": "mask"},
    )
    compare_mode: str = field(
        default="bf16",
        metadata={
            "help": "comparison mode the result will be judged in; a mask built in another mode is warned about",
            "choices": ("bf16", "fp32", "native"),
            "aliases": ("--compare-dtype",),
            "group": "mask",
        },
    )
    allow_full: bool = field(
        default=False, metadata={"help": "accept a mask of density 1 without a warning", "group": "mask"}
    )
    name: str | None = field(
        default=None,
        metadata={"help": "stage name", "default_help": "ALGORITHM, or ALGORITHM-sub with --mask", "group": STAGE},
    )
    samples: str | None = field(
        default=None,
        metadata={"help": "θ0's own samples (needed by own-pairs / own-correct)", "metavar": "JSONL", "group": LAB},
    )
    eval_task: list[str] | None = field(
        default=None,
        metadata={
            "help": "held-out task to evaluate; repeatable",
            "choices": tuple(TASKS),
            "default_help": "--task",
            "group": LAB,
        },
    )
    json: bool = field(default=False, metadata={"help": "print the stage record (and mask report) as JSON"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar", "aliases": ("-q",)})

    def __post_init__(self):
        check_choices(self)
        for name in ("gradient_accumulation_steps", "max_length", "max_completion_length"):
            if getattr(self, name) is not None:
                limits.integer(getattr(self, name), option(TrainConfig, name), 1, limits.MAX_STEPS)
        if self.momentum is not None:
            limits.real(self.momentum, "--momentum")


# options of --model runs only (None unless given)
MODEL_ONLY = ("dataset", "reward", "momentum", "gradient_accumulation_steps", "max_length", "max_completion_length")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="finetune any causal LM (or a lab model) with TRL (GRPO, DPO or SFT), optionally on a mask only",
        description="Finetune any Hugging Face causal LM (--model) or a lab model (--base) with one of TRL's "
        "trainers. With --mask, only the mask's entries train; everything else stays bit-identical.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_dataclass_arguments(p, TrainConfig)
    add_dataclass_arguments(p, StageSpec, exclude=("name",), group=STAGE)
    # --model trains on --dataset or on the lab's --task: whether --task was given decides which (the
    # namespace holds its default either way)
    for action in p._actions:
        if "--task" in action.option_strings:
            action.__class__ = _NotedStore
    p.set_defaults(run=run, task_given=False)


class _NotedStore(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.task_given = True


def run(args: argparse.Namespace) -> int:
    cfg = from_args(TrainConfig, args)
    if (cfg.model is None) == (cfg.base is None):
        raise UsageError("give --model DIR (any causal LM) or --base DIR (a lab model), one of them")
    if cfg.model is not None:
        from rlsubnet.cli.train_model import run_model

        with output_lock(cfg.out, members=("train.json",)):
            return run_model(cfg, args)
    given = [option(TrainConfig, n) for n in MODEL_ONLY if getattr(cfg, n) is not None]
    if given or cfg.optim != "adamw":
        raise UsageError(f"{(given or ['--optim'])[0]} applies to --model, not to a lab stage (--base)")
    with output_lock(cfg.out, members=("mask.json",)):  # one writer per output, for the whole run
        return _run(cfg, args)


def _run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    try:
        from rlsubnet.lab.stages import run_stage
        from rlsubnet.masks import Mask, MaskError
        from rlsubnet.train import check_frozen_masters
    except ImportError as exc:  # the train extra (transformers, trl, datasets) is missing
        raise UsageError(f"`rlsubnet train` needs the train extra (pip install 'rlsubnet[train]'): {exc}") from None

    name = cfg.name or (f"{args.algorithm}-sub" if cfg.mask else args.algorithm)
    spec = from_args(StageSpec, args, name=name)  # options first: a bad one is refused before any input is read
    if cfg.strict and cfg.optimizer_state == "sparse":
        raise UsageError("--strict applies to --optimizer-state dense (sparse state never writes a frozen entry)")
    base_dir = Path(cfg.base or "")
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir}: not a lab model folder (no config.json)")
    mask = Mask.load(cfg.mask) if cfg.mask else None
    if spec.uses_own_samples and not cfg.samples:
        raise UsageError(f"--data {spec.data} needs θ0's own samples: pass --samples JSONL")

    callbacks: list = []
    extra: dict[str, Any] | None = None
    configure = None
    if mask is not None:
        from rlsubnet.train import attach_mask, attach_sparse

        warn_if_other_base(mask, base_dir)
        options: dict[str, Any] = {
            "mask_before_clip": cfg.mask_before_clip,
            "compare_mode": cfg.compare_mode,
            "allow_full": cfg.allow_full,
        }
        if cfg.optimizer_state == "dense":
            options["strict"] = True if cfg.strict else None
        extra = {
            "mask": {
                "path": str(cfg.mask),
                "kind": mask.kind,
                "atol": mask.atol,
                "dtype": mask.mode,
                "density": mask.density,
                "bits_sha256": mask.bits_sha256(),
                "options": dict(options),
                "optimizer_state": cfg.optimizer_state,
            }
        }

        def configure(trainer):
            attach = attach_sparse if cfg.optimizer_state == "sparse" else attach_mask
            callbacks.append(attach(trainer, mask, **options))

    result = run_stage(
        spec,
        base_dir=base_dir,
        out_dir=cfg.out,
        samples_path=cfg.samples,
        eval_tasks=cfg.eval_task,
        configure_trainer=configure,
        extra_record=extra,
        progress=not cfg.quiet,
        overwrite=cfg.overwrite,
    )
    report: dict[str, Any] | None = None
    if mask is not None and extra is not None:
        report = {
            "mask": extra["mask"],
            "optimizer": callbacks[0].last_report if callbacks else None,
            "check": check_frozen_masters(mask, base_dir, result.master_path),
        }
        atomic_write_text(Path(cfg.out) / "mask.json", json.dumps(report, indent=2) + "\n")
        if report["check"]["frozen_entries_moved"]:
            raise MaskError(
                f"{result.master_path}: {report['check']['frozen_entries_moved']} entries outside the mask moved "
                f"({', '.join(report['check']['moved_by_tensor'])}); see {cfg.out}/mask.json"
            )
    if cfg.json:
        json.dump({"stage": result.record, "mask": report}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rec = result.record
    print(f"wrote {cfg.out}: {rec['settings']}")
    for task, acc in rec.get("accuracy", {}).items():
        print(f"  held-out accuracy on {task}: {acc['bf16']['accuracy']:.2%} (bf16 model, n = {acc['bf16']['n']:,})")
    if report is not None:
        opt = report["optimizer"] or {}
        c = report["check"]
        print(
            f"  mask {cfg.mask}: trained {opt.get('trainable', 0):,} of {opt.get('numel', 0):,} entries "
            f"(density {opt.get('density', 0):.4f}); {opt.get('order')}; {opt.get('mode') or opt.get('state')}"
        )
        print(
            f"  fp32 masters outside the mask: {c['frozen_entries_moved']} of {c['frozen_entries_checked']:,} "
            "entries moved (bitwise against θ0)"
        )
    return 0


def warn_if_other_base(mask, base_dir) -> None:
    """Warn when the mask records a different θ0 than the one training starts from (content hash)."""
    from rlsubnet.checkpoint import open_checkpoint
    from rlsubnet.checkpoint.hashing import HASH_SCHEME, hash_checkpoint

    rec = mask.meta.get("base") or {}
    if not rec.get("content_hash") or rec.get("content_scope") != "all tensors":
        return
    if rec.get("content_hash_scheme") != HASH_SCHEME:  # an older mask's hash: not comparable
        return
    ck = open_checkpoint(base_dir)
    try:
        digest = hash_checkpoint(ck).digest
    finally:
        ck.close()
    if digest != rec["content_hash"]:
        msg = (
            f"the mask was measured from base {rec.get('source')!r}, whose weights differ from {base_dir} "
            "(content hashes differ): this is not that run's subnetwork"
        )
        warnings.warn(msg, stacklevel=2)
        print(f"rlsubnet: warning: {msg}", file=sys.stderr)
