"""The trial that chose the demo's SGD learning rate (``SGD_LR`` in rlsubnet.lab.config; docs/demo.md).

Criterion: the smallest learning rate of the grid at which GRPO with plain SGD improves greedy accuracy at least as
much as GRPO with AdamW at the RL learning rate. The trial never touches the scored run: it trains with another seed
(trainer seed and data order) and scores on the task's *validation* split, which no stage trains on and the demo's
held-out figures never use. Everything else is the demo's ``grpo`` stage (100 steps of 32 prompts, 8 completions,
no KL term, clipping at 1), from the demo's θ0.

    PYTHONPATH=src python benchmarks/sgd_lr_trial.py --base runs/demo/stages/pretrain/model --lrs 1e-3,3e-3,1e-2
    (--runs adamw: the AdamW reference only; --runs sgd: the grid only; default both)

One JSON line per run: optimizer, lr, validation accuracy of the bf16 weights (as the demo's checkpoints are
measured) for every task, its gain over θ0, and the bf16 sparsity against θ0 at atol 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(base: Path, optimizer: str, lr: float, seed: int, steps: int, task: str, tasks: list[str]) -> dict:
    from rlsubnet.lab.config import StageSpec
    from rlsubnet.lab.data import stage_rows
    from rlsubnet.lab.evaluate import greedy_accuracy
    from rlsubnet.lab.model import load_model
    from rlsubnet.lab.shared_prompts import share_prompts
    from rlsubnet.lab.tasks import get_task
    from rlsubnet.lab.tokenizer import load_tokenizer
    from rlsubnet.lab.trainers import build_trainer

    spec = StageSpec(
        f"trial-{optimizer}", "grpo", task=task, optimizer=optimizer, learning_rate=lr, steps=steps, seed=seed
    )
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    base_state = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
    rows, _ = stage_rows(spec)
    t0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(spec, model, tokenizer, rows, base_dir=base, output_dir=Path(tmp) / "trainer")
        share_prompts(trainer.model)  # GRPO's loss as the demo's stages run it: each prompt once
        trainer.train()
    model = trainer.model
    with torch.no_grad():  # evaluate what a stage's checkpoint holds: the masters rounded to bf16
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    changed = numel = 0
    for n, p in model.named_parameters():
        numel += p.numel()
        changed += int(((p.detach().float() - base_state[n].float()).abs() > 1e-5).sum())
    acc = {}
    for t in tasks:
        tk = get_task(t)
        acc[t] = greedy_accuracy(model, tokenizer, tk.split("validation"), tk.max_answer_chars + 1)["accuracy"]
    return {
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "validation_accuracy": acc,
        "sparsity_bf16_1e-5": 1 - changed / numel,
        "cpu_s": time.process_time() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="θ0: the demo's stages/pretrain/model")
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2", help="SGD learning rates, comma-separated")
    ap.add_argument("--adamw-lr", type=float, default=1e-6, help="the AdamW reference (the demo's RL lr)")
    ap.add_argument("--seed", type=int, default=1, help="not the demo's seed 0")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--task", default="add")
    ap.add_argument("--runs", choices=("both", "adamw", "sgd"), default="both")
    args = ap.parse_args(argv)
    if args.seed == 0:
        print("sgd_lr_trial: --seed 0 is the scored run's seed; use another", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    from rlsubnet.lab.evaluate import greedy_accuracy
    from rlsubnet.lab.model import load_model
    from rlsubnet.lab.stages import quiet_libraries
    from rlsubnet.lab.tasks import TASKS, get_task
    from rlsubnet.lab.tokenizer import load_tokenizer

    quiet_libraries()
    tasks = list(TASKS)
    model, tok = load_model(args.base), load_tokenizer(args.base)
    theta0 = {
        t: greedy_accuracy(model, tok, get_task(t).split("validation"), get_task(t).max_answer_chars + 1)["accuracy"]
        for t in tasks
    }
    print(json.dumps({"theta0_validation_accuracy": theta0}), flush=True)
    plan = []
    if args.runs in ("both", "adamw"):
        plan.append(("adamw", args.adamw_lr))
    if args.runs in ("both", "sgd"):
        plan += [("sgd", float(x)) for x in args.lrs.split(",")]
    for optimizer, lr in plan:
        rec = run(args.base, optimizer, lr, args.seed, args.steps, args.task, tasks)
        rec["gain"] = {t: rec["validation_accuracy"][t] - theta0[t] for t in tasks}
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
