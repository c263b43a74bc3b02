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

from rlsubnet import limits
from rlsubnet.cli.common import Number, Seed

DEFAULT_DATA = {"grpo": "prompts", "dpo": "own-pairs", "sft": "gold"}
DEFAULT_BETA = {"grpo": 0.0, "dpo": 0.1, "sft": 0.0}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="finetune a lab model with TRL (GRPO, DPO or SFT), optionally restricted to a mask",
        description="Run one TRL finetuning stage on a lab model (a bf16 θ0 folder with its tokenizer, as the demo "
        "writes). With --mask, only the mask's entries train; everything else stays bit-identical.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("algorithm", choices=["grpo", "dpo", "sft"])
    p.add_argument("--base", required=True, metavar="DIR", help="θ0: a lab model folder (bf16 weights, config, tokenizer)")
    p.add_argument("--out", required=True, metavar="DIR", help="stage folder to write (model/, master-fp32, stage.json...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    g = p.add_argument_group("mask")
    g.add_argument("--mask", metavar="FILE", help="train only this mask's entries (a file from `rlsubnet mask`)")
    g.add_argument("--mask-before-clip", action="store_true",
                   help="mask the gradient before clipping (default: clip the full gradient, then mask, as the paper)")
    g.add_argument("--strict", action="store_true", help="also restore frozen entries after every step")
    g.add_argument("--compare-dtype", choices=["bf16", "fp32", "native"], default="bf16",
                   help="dtype the result will be compared in; a mask built in another dtype is warned about")
    g.add_argument("--allow-full", action="store_true", help="accept a mask of density 1 without a warning")
    s = p.add_argument_group("stage")
    s.add_argument("--name", help="stage name (default: ALGORITHM, or ALGORITHM-sub with --mask)")
    s.add_argument("--task", default="add", help="task to train on (default: add)")
    s.add_argument("--data", help="prompts (grpo), own-pairs (dpo), gold or own-correct (sft); default per algorithm")
    s.add_argument("--samples", metavar="JSONL", help="θ0's own samples (needed by own-pairs / own-correct)")
    s.add_argument("--lr", type=Number("--lr", float, lo_open=True), default=1e-6, help="learning rate (default: %(default)s)")
    s.add_argument("--steps", type=Number("--steps", int, 1, limits.MAX_STEPS), default=100, help="optimizer steps (default: %(default)s)")
    s.add_argument("--batch-size", type=Number("--batch-size", int, 1, limits.MAX_BATCH), default=32, help="prompts (grpo), pairs (dpo) or examples (sft) per step")
    s.add_argument("--seed", type=Seed(), default=0, help="trainer seed (default: %(default)s)")
    s.add_argument("--data-seed", type=Seed("--data-seed"), help="seed of the data order (default: --seed)")
    s.add_argument("--max-grad-norm", type=Number("--max-grad-norm", float), default=1.0, help="gradient clipping; 0 disables it")
    s.add_argument("--beta", type=Number("--beta", float), help="GRPO KL coefficient (default 0) or DPO β (default 0.1)")
    s.add_argument("--num-generations", type=Number("--num-generations", int, 2, limits.MAX_GENERATIONS), default=8, help="GRPO completions per prompt")
    s.add_argument("--weight-decay", type=Number("--weight-decay", float), default=0.0, help="AdamW weight decay (masked runs: inside the mask only)")
    s.add_argument("--snapshot-every", type=Number("--snapshot-every", int, 1, limits.MAX_STEPS), default=10, help="steps between bf16 snapshots")
    s.add_argument("--eval-task", action="append", help="held-out tasks to evaluate (default: --task); repeatable")
    p.add_argument("--json", action="store_true", help="print the stage record (and mask report) as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def check_frozen_masters(mask, base_dir, master_path) -> dict:
    """Count entries outside the mask whose fp32 master differs (bitwise) from θ0's value upcast to fp32
    (:func:`rlsubnet.train.verify.check_frozen_masters`)."""
    from rlsubnet.train.verify import check_frozen_masters as check

    return check(mask, base_dir, master_path)


def run(args: argparse.Namespace) -> int:
    from rlsubnet.fileio import output_lock

    with output_lock(args.out, members=("mask.json",)):  # one writer per output, for the whole run
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlsubnet.errors import UsageError
    from rlsubnet.fileio import atomic_write_text

    try:
        from rlsubnet.lab.stages import StageSpec, run_stage
    except ImportError as exc:  # the train extra (transformers, trl, datasets) is missing
        raise UsageError(f"`rlsubnet train` needs the train extra (pip install 'rlsubnet[train]'): {exc}") from None

    base_dir = Path(args.base)
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir}: not a lab model folder (no config.json)")
    mask = None
    if args.mask:
        from rlsubnet.masks import Mask

        mask = Mask.load(args.mask)
    beta = args.beta if args.beta is not None else DEFAULT_BETA[args.algorithm]
    name = args.name or (f"{args.algorithm}-sub" if mask is not None else args.algorithm)
    spec = StageSpec(
        name=name, algorithm=args.algorithm, task=args.task, data=args.data or DEFAULT_DATA[args.algorithm],
        learning_rate=args.lr, steps=args.steps, batch_size=args.batch_size, seed=args.seed, data_seed=args.data_seed,
        max_grad_norm=args.max_grad_norm, beta=beta, num_generations=args.num_generations,
        weight_decay=args.weight_decay, snapshot_every=args.snapshot_every,
    )
    if spec.uses_own_samples and not args.samples:
        raise UsageError(f"--data {spec.data} needs θ0's own samples: pass --samples JSONL")

    callbacks: list = []
    extra = None
    configure = None
    if mask is not None:
        from rlsubnet.train import attach_mask

        warn_if_other_base(mask, base_dir)
        options = {"strict": True if args.strict else None, "mask_before_clip": args.mask_before_clip,
                   "compare_dtype": args.compare_dtype, "allow_full": args.allow_full}
        extra = {"mask": {"path": str(args.mask), "kind": mask.kind, "atol": mask.atol, "dtype": mask.dtype,
                          "density": mask.density, "bits_sha256": mask.bits_sha256(),
                          "options": {k: v for k, v in options.items()}}}

        def configure(trainer):
            callbacks.append(attach_mask(trainer, mask, **options))

    result = run_stage(
        spec, base_dir=base_dir, out_dir=args.out, samples_path=args.samples, eval_tasks=args.eval_task,
        configure_trainer=configure, extra_record=extra, progress=not args.quiet, overwrite=args.overwrite,
    )
    report = None
    if mask is not None:
        report = {"mask": extra["mask"], "optimizer": callbacks[0].last_report if callbacks else None,
                  "check": check_frozen_masters(mask, base_dir, result.master_path)}
        atomic_write_text(Path(args.out) / "mask.json", json.dumps(report, indent=2) + "\n")
        if report["check"]["frozen_entries_moved"]:
            from rlsubnet.masks import MaskError

            raise MaskError(
                f"{result.master_path}: {report['check']['frozen_entries_moved']} entries outside the mask moved "
                f"({', '.join(report['check']['moved_by_tensor'])}); see {args.out}/mask.json"
            )
    if args.json:
        json.dump({"stage": result.record, "mask": report}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rec = result.record
    print(f"wrote {args.out}: {rec['settings']}")
    for task, acc in rec.get("accuracy", {}).items():
        print(f"  held-out accuracy on {task}: {acc['bf16']['accuracy']:.2%} (bf16 model, n = {acc['bf16']['n']:,})")
    if report is not None:
        opt = report["optimizer"] or {}
        c = report["check"]
        print(f"  mask {args.mask}: trained {opt.get('trainable', 0):,} of {opt.get('numel', 0):,} entries "
              f"(density {opt.get('density', 0):.4f}); {opt.get('order')}; {opt.get('mode')}")
        print(f"  fp32 masters outside the mask: {c['frozen_entries_moved']} of {c['frozen_entries_checked']:,} "
              "entries moved (bitwise against θ0)")
    return 0


def warn_if_other_base(mask, base_dir) -> None:
    """Warn when the mask records a different θ0 than the one training starts from (content hash)."""
    import warnings

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
        msg = (f"the mask was measured from base {rec.get('source')!r}, whose weights differ from {base_dir} "
               "(content hashes differ): this is not that run's subnetwork")
        warnings.warn(msg, stacklevel=2)
        print(f"rlsubnet: warning: {msg}", file=sys.stderr)
