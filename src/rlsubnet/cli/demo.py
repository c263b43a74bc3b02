"""``rlsubnet demo``: reproduce the paper's measurements on a tiny model, offline, with TRL's trainers.

    rlsubnet demo --out runs/demo                   # ~1M-parameter model, the default (make demo)
    rlsubnet demo --out runs/medium --size medium   # ~4M parameters
    rlsubnet demo --out runs/micro --size micro     # seconds; what the tests run

Every option comes from :class:`rlsubnet.lab.config.DemoConfig` (what the run computes) and
:class:`rlsubnet.lab.config.DemoOptions` (how it runs).
"""

from __future__ import annotations

import argparse
import os

from rlsubnet.cli.config_args import add_dataclass_arguments, from_args
from rlsubnet.lab.config import DemoConfig, DemoOptions


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
    add_dataclass_arguments(p, DemoOptions)
    add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")  # nothing in the demo downloads; make sure nothing tries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = from_args(DemoOptions, args)
    cfg = from_args(DemoConfig, args)
    from rlsubnet.lab.pipeline import run_demo  # torch and the train extra: only once there is a run

    run_demo(cfg, options.out, fresh=options.fresh, progress=not options.quiet, jobs=options.jobs)
    return 0
