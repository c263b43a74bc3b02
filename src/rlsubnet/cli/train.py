"""``rlsubnet train {grpo,dpo,sft}``: finetune a lab model with TRL, optionally restricted to a mask.

    rlsubnet train grpo --base runs/demo/stages/pretrain/model --mask runs/demo/masks/grpo.mask.safetensors --lr 1e-6 --steps 100 --out runs/grpo-sub
    rlsubnet train dpo  --base runs/demo/stages/pretrain/model --samples runs/demo/stages/samples/samples.jsonl --out runs/dpo-full

The stage is the lab's (:func:`rlsubnet.lab.stages.run_stage`): the same spec (seed, data seed, learning rate,
steps...) gives the same rows in the same order and the same sampling, so a masked re-run differs from the full
run only by the mask. With ``--mask`` the trainer's optimizer is restricted to the mask (clip the full gradient,
then mask; weight decay inside the mask), and after training the fp32 master weights outside the mask are
checked bit for bit against θ0; the result goes to ``OUT/mask.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsubnet.cli.config_args import add_dataclass_arguments, from_args
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_write_text, output_lock
from rlsubnet.lab.config import StageSpec, check_choices
from rlsubnet.lab.tasks import TASKS

STAGE = "stage"


@dataclass(frozen=True)
class TrainConfig:
    """What ``rlsubnet train`` needs beyond the stage's own settings (:class:`rlsubnet.lab.config.StageSpec`)."""

    base: str = field(metadata={"help": "θ0: a lab model folder (bf16 weights, config, tokenizer)", "metavar": "DIR"})
    out: str = field(metadata={"help": "stage folder to write (model/, master-fp32, stage.json...)", "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    mask: str | None = field(
        default=None,
        metadata={
            "help": "train only this mask's entries (a file from `rlsubnet mask`)",
            "metavar": "FILE",
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
        default=False, metadata={"help": "also restore frozen entries after every step", "group": "mask"}
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
        metadata={"help": "θ0's own samples (needed by own-pairs / own-correct)", "metavar": "JSONL", "group": STAGE},
    )
    eval_task: list[str] | None = field(
        default=None,
        metadata={
            "help": "held-out task to evaluate; repeatable",
            "choices": tuple(TASKS),
            "default_help": "--task",
            "group": STAGE,
        },
    )
    json: bool = field(default=False, metadata={"help": "print the stage record (and mask report) as JSON"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar", "aliases": ("-q",)})

    def __post_init__(self):
        check_choices(self)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="finetune a lab model with TRL (GRPO, DPO or SFT), optionally restricted to a mask",
        description="Run one TRL finetuning stage on a lab model (a bf16 θ0 folder with its tokenizer, as the demo "
        "writes). With --mask, only the mask's entries train; everything else stays bit-identical.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_dataclass_arguments(p, TrainConfig)
    add_dataclass_arguments(p, StageSpec, exclude=("name",), group=STAGE)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(TrainConfig, args)
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
    base_dir = Path(cfg.base)
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir}: not a lab model folder (no config.json)")
    mask = Mask.load(cfg.mask) if cfg.mask else None
    if spec.uses_own_samples and not cfg.samples:
        raise UsageError(f"--data {spec.data} needs θ0's own samples: pass --samples JSONL")

    callbacks: list = []
    extra: dict[str, Any] | None = None
    configure = None
    if mask is not None:
        from rlsubnet.train import attach_mask

        warn_if_other_base(mask, base_dir)
        options = {
            "strict": True if cfg.strict else None,
            "mask_before_clip": cfg.mask_before_clip,
            "compare_mode": cfg.compare_mode,
            "allow_full": cfg.allow_full,
        }
        extra = {
            "mask": {
                "path": str(cfg.mask),
                "kind": mask.kind,
                "atol": mask.atol,
                "dtype": mask.mode,
                "density": mask.density,
                "bits_sha256": mask.bits_sha256(),
                "options": dict(options),
            }
        }

        def configure(trainer):
            callbacks.append(attach_mask(trainer, mask, **options))

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
            f"(density {opt.get('density', 0):.4f}); {opt.get('order')}; {opt.get('mode')}"
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
