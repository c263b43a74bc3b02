"""``rlsubnet demo``: reproduce the paper's measurements on a tiny model, offline, with TRL's trainers.

    rlsubnet demo --out runs/demo                   # ~1M-parameter model, the default (make demo)
    rlsubnet demo --out runs/medium --size medium   # ~4M parameters
    rlsubnet demo --out runs/micro --size micro     # seconds; what the tests run
"""

from __future__ import annotations

import argparse

from rlsubnet import limits
from rlsubnet.cli.common import Number, Seed

SIZES = ("micro", "small", "medium")
TASKS = ("add", "sub")  # rlsubnet.lab.tasks.TASKS, listed here so that --help needs no heavy import


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="pretrain a tiny LM offline, finetune it with TRL (GRPO, DPO, SFT, RFT), measure update sparsity, "
        "re-train the subnetworks and measure their overlap",
        description="Reproduce the paper's measurements end to end on a tiny Llama-style model built offline: "
        "pretraining until a validation accuracy target, then GRPO (with/without KL, with/without clipping), DPO, SFT at "
        "the usual and at the RL learning rate, and rejection-sampling FT, all from the same bf16 θ0 with TRL's "
        "trainers; every sparsity figure comes from the compare engine. Then the subnetwork experiments: GRPO and DPO "
        "re-run from θ0 on their own subnetwork and on a random mask of equal density, extra seeds, identity with the "
        "full runs and overlap of the subnetworks against two chance baselines. Writes report.md, figures/*.png, "
        "masks/ and results.json to --out. Re-running reuses finished stages.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--size", default="small", help=f"model size: {', '.join(SIZES)} (default: %(default)s)")
    p.add_argument("--task", default="add", help=f"training task: {', '.join(TASKS)} (default: %(default)s)")
    p.add_argument("--second-task", default=None, metavar="TASK",
                   help="second training set, a different task (default: the other task); 'none' to skip it")
    p.add_argument("--seed", type=Seed(), default=0, help="seed of every stage (default: %(default)s)")
    p.add_argument("--threads", type=Number("--threads", int, 1, limits.MAX_THREADS), default=1,
                   help="torch CPU threads (default: %(default)s; part of the configuration, as it changes the numbers)")
    p.add_argument("--jobs", "-j", type=Number("--jobs", int, 1, limits.MAX_JOBS), default=None, metavar="N",
                   help="finetuning stages to run at once, each in its own process (default: one per CPU core the "
                        "thread count leaves, at most 4; never changes a number, only the wall time)")
    p.add_argument("--fresh", action="store_true", help="discard the results already in --out and start over")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    g = p.add_argument_group("training (defaults depend on --size)")
    g.add_argument("--steps", type=Number("--steps", int, 1, limits.MAX_STEPS), help="optimizer steps of every finetuning stage (small: 100)")
    g.add_argument("--batch-size", type=Number("--batch-size", int, 1, limits.MAX_BATCH), help="prompts, pairs or examples per step (small: 32)")
    g.add_argument("--rl-lr", type=Number("--rl-lr", float, lo_open=True), default=1e-6, help="learning rate of GRPO and DPO (default: %(default)g)")
    g.add_argument("--sft-lr", type=Number("--sft-lr", float, lo_open=True), default=1e-5, help="usual SFT learning rate (default: %(default)g)")
    g.add_argument("--kl-beta", type=Number("--kl-beta", float), default=0.04, help="KL coefficient of grpo-kl (default: %(default)g)")
    g.add_argument("--snapshot-every", type=Number("--snapshot-every", int, 1, limits.MAX_STEPS), help="steps between bf16 snapshots (small: 10)")
    g.add_argument("--pretrain-target", type=Number("--pretrain-target", float, 0, 1), help="validation accuracy (every task) that ends pretraining (small: 0.6)")
    g.add_argument("--pretrain-max-steps", type=Number("--pretrain-max-steps", int, 1, limits.MAX_STEPS), help="pretraining step cap (small: 2000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the demo downloads; make sure nothing tries
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlsubnet.errors import UsageError
    from rlsubnet.lab.pipeline import DemoConfig, run_demo

    if args.size not in SIZES:
        raise UsageError(f"unknown --size {args.size!r} (choose from {', '.join(SIZES)})")
    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r} (choose from {', '.join(TASKS)})")
    second = args.second_task
    if second is None:
        second = next(t for t in TASKS if t != args.task)
    elif second.lower() == "none":
        second = None
    elif second not in TASKS:
        raise UsageError(f"unknown --second-task {second!r} (choose from {', '.join(TASKS)} or none)")
    cfg = DemoConfig(
        size=args.size, task=args.task, second_task=second, seed=args.seed, threads=args.threads, steps=args.steps, batch_size=args.batch_size,
        rl_lr=args.rl_lr, sft_lr=args.sft_lr, kl_beta=args.kl_beta, snapshot_every=args.snapshot_every,
        pretrain_target=args.pretrain_target, pretrain_max_steps=args.pretrain_max_steps,
    )
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    run_demo(cfg, args.out, fresh=args.fresh, progress=not args.quiet, jobs=args.jobs)
    return 0
