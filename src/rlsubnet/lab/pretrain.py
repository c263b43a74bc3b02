"""The base model θ0 and θ0's own samples.

Pretraining runs TRL's SFTTrainer from a random initialisation on the gold answers of every task's training
split, loss on the answer only, and stops when greedy accuracy on each task's *validation* split reaches a
target (checked every ``eval_every`` steps), not after a fixed step count: when the skill appears varies by
seed. The held-out split is never looked at before θ0 is fixed. θ0 is saved in bf16: it is the base of every
comparison, and the fp32 masters of every later stage start at its bf16 values exactly.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlsubnet._threads import torch_threads
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_dir, atomic_write_text
from rlsubnet.lab.config import model_size
from rlsubnet.lab.data import sft_features
from rlsubnet.lab.evaluate import generate, greedy_accuracy
from rlsubnet.lab.model import build_model, count_parameters, load_model
from rlsubnet.lab.prefill import dedupe_prefill
from rlsubnet.lab.progress import StageProgress
from rlsubnet.lab.rewards import is_correct, normalise_completion
from rlsubnet.lab.stages import (
    StageResult,
    fingerprint,
    heldout_accuracy,
    library_versions,
    model_digest,
    quiet_libraries,
    save_trained,
)
from rlsubnet.lab.tasks import get_task, ordered
from rlsubnet.lab.tokenizer import EOS, build_tokenizer, load_tokenizer
from rlsubnet.lab.trainers import common_args, default_optimizer, make_trainer, sft_settings, train_timed


@dataclass(frozen=True)
class PretrainSpec:
    size: str
    tasks: tuple[str, ...]
    seed: int = 0
    learning_rate: float = 2e-3
    batch_size: int = 64
    warmup_steps: int = 50
    max_steps: int = 2000
    eval_every: int = 50
    target_accuracy: float = 0.6
    threads: int = 1  # torch threads of the training and its checks: part of the spec, like every thread count

    def __post_init__(self):
        model_size(self.size)
        for t in self.tasks:
            get_task(t)
        if not self.tasks:
            raise UsageError("pretraining needs at least one task")
        if self.max_steps < 1 or self.eval_every < 1 or self.threads < 1:
            raise UsageError("pretraining max_steps, eval_every and threads must be positive")
        if not 0 <= self.target_accuracy <= 1:
            raise UsageError(f"pretraining target accuracy must be in [0, 1], got {self.target_accuracy}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    def settings_line(self) -> str:
        return (
            f"SFT from scratch on {'+'.join(self.tasks)} (gold answers), lr {self.learning_rate:g} constant after "
            f"{self.warmup_steps} warm-up steps, batch {self.batch_size}, seed {self.seed}, stop at validation "
            f"accuracy ≥ {self.target_accuracy:.0%} on every task (checked every {self.eval_every} steps, "
            f"at most {self.max_steps} steps), {self.threads} torch thread{'s' if self.threads > 1 else ''}"
        )


def pretrain_rows(spec: PretrainSpec) -> list[dict]:
    """``max_steps × batch_size`` gold examples, the tasks interleaved in a seeded order."""
    n = spec.max_steps * spec.batch_size
    per_task = [
        ordered(get_task(t).split("train"), -(-n // len(spec.tasks)), spec.seed + 7919 * i)
        for i, t in enumerate(spec.tasks)
    ]
    mixed = [p for group in zip(*per_task) for p in group][:n]
    random.Random(f"mix:{spec.seed}").shuffle(mixed)
    return [{"prompt": p.prompt, "completion": p.answer} for p in mixed]


def run_pretrain(
    spec: PretrainSpec,
    out_dir: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    pool=None,
    before_training: Callable[[], None] | None = None,
):
    """Train θ0 on ``spec.threads`` torch threads and write ``out_dir`` (model/ in bf16 with the tokenizer,
    master-fp32, curve, stage.json).

    ``pool``: an executor (the demo's worker processes, torch threads as ``spec.threads``) that runs the validation
    checks beside the training, for a training that leaves a core free; None checks inline. Either way θ0, its step
    and its curve are the same. ``before_training()`` is called once the data and model are ready, just before the
    first step (the demo waits there for its workers to finish importing, so that they do not compete with it)."""
    with torch_threads(spec.threads):
        return _pretrain(spec, Path(out_dir), progress, overwrite, pool, before_training)


def _pretrain(spec: PretrainSpec, out_dir: Path, progress: bool, overwrite: bool, pool, before_training):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    quiet_libraries()
    t_start = time.monotonic()
    tokenizer = build_tokenizer()
    model = build_model(spec.size, tokenizer, spec.seed)
    rows = pretrain_rows(spec)
    dataset = Dataset.from_dict(sft_features(rows, tokenizer))
    tasks = [get_task(t) for t in spec.tasks]
    bar = StageProgress("pretrain", spec.max_steps, enabled=progress)
    fp = fingerprint({"pretrain": spec.to_json()})

    class StopAtTarget(TrainerCallback):
        """Validation accuracy every ``eval_every`` steps; training stops at the first check that reaches the target.

        With a worker ``pool`` the check runs there on a copy of the weights while training goes on; when a check
        comes back at the target, training stops and θ0 is the copy: the same weights, step and curve as checking
        inline, since training never depends on the checks. The pool's process runs the same model code with the
        same weights and thread count, so it computes the same accuracies."""

        def __init__(self) -> None:
            self.curve: list[dict] = []
            self.reached_at: int | None = None
            self.reached_state: dict | None = None
            self.last_loss = None
            self.pending: list[tuple[int, Any, dict, Future]] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.last_loss = logs["loss"]

        def record(self, step: int, loss, acc: dict) -> bool:
            self.curve.append({"step": step, "validation_accuracy": acc, "loss": loss})
            if min(acc.values()) >= spec.target_accuracy:
                self.reached_at = step
                return True
            return False

        def collect(self, block: bool) -> None:
            while self.pending and self.reached_at is None and (block or self.pending[0][3].done()):
                step, loss, weights, future = self.pending.pop(0)
                if self.record(step, loss, future.result()):
                    self.reached_state = weights
            if self.reached_at is not None:
                for *_, future in self.pending:
                    future.cancel()
                self.pending.clear()

        def on_step_end(self, args, state, control, model=None, **kw):
            step = state.global_step
            if self.reached_at is None and (step % spec.eval_every == 0 or step == spec.max_steps):
                if pool is None:
                    acc = {
                        t.name: greedy_accuracy(model, tokenizer, t.split("validation"), t.max_answer_chars + 1)[
                            "accuracy"
                        ]
                        for t in tasks
                    }
                    self.record(step, self.last_loss, acc)
                else:
                    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    future = pool.submit(
                        validation_accuracy,
                        model.config,
                        model.generation_config,
                        weights,
                        list(spec.tasks),
                        spec.threads,
                    )
                    self.pending.append((step, self.last_loss, weights, future))
            # At the last step every check must be in; otherwise wait only when checks pile up (memory).
            self.collect(block=step >= spec.max_steps or len(self.pending) > 2)
            if self.reached_at is not None:
                control.should_training_stop = True
            logs = {"loss": self.last_loss} if self.last_loss is not None else {}
            if self.curve:
                logs["val_acc"] = min(self.curve[-1]["validation_accuracy"].values())
            bar.update(min(step, self.reached_at or step), logs)

    stopper = StopAtTarget()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        args = SFTConfig(
            **common_args(
                str(tmp / "trainer"),
                learning_rate=spec.learning_rate,
                steps=spec.max_steps,
                seed=spec.seed,
                max_grad_norm=1.0,
                weight_decay=0.0,
                lr_scheduler_type="constant_with_warmup",
                warmup_steps=spec.warmup_steps,
            ),
            **sft_settings(spec.batch_size),
        )
        trainer = make_trainer(SFTTrainer, model, args, dataset, tokenizer, [stopper], default_optimizer(model, args))
        if before_training is not None:
            before_training()
        try:
            train_seconds = train_timed(trainer, tmp / "trainer", bar)
        finally:
            for *_, future in stopper.pending:
                future.cancel()
        model = trainer.model
        assert model is not None
        if stopper.reached_state is not None:
            # Training ran on while the check of step reached_at was out; θ0 is the weights that were checked.
            model.load_state_dict(stopper.reached_state)
        steps_done = stopper.reached_at if stopper.reached_at is not None else trainer.state.global_step
        theta0 = save_trained(model, tmp, tokenizer, "pretrain", fp)
        accuracy = {t.name: heldout_accuracy(theta0, model, tokenizer, t) for t in tasks}
        record = {
            "name": "pretrain",
            "kind": "pretrain",
            "fingerprint": fp,
            "spec": spec.to_json(),
            "settings": spec.settings_line(),
            "parameters": count_parameters(model),
            "steps_done": steps_done,
            "target_reached": stopper.reached_at is not None,
            "reached_at_step": stopper.reached_at,
            "curve": stopper.curve,
            "accuracy": accuracy,
            "optimizer": {"class": "torch.optim.AdamW", "lr": spec.learning_rate, "weight_decay": 0.0},
            "timings": {"train_s": train_seconds, "total_s": time.monotonic() - t_start},
            "versions": library_versions(),
        }
        atomic_write_text(tmp / "stage.json", json.dumps(record, indent=2) + "\n")
    return StageResult(name="pretrain", dir=out_dir, record=record)


def validation_accuracy(
    config, generation_config, weights: dict, task_names: list[str], threads: int
) -> dict[str, float]:
    """Greedy accuracy on each task's validation split of a lab model given by its config and weights (run in a
    worker process during pretraining, on the training's thread count)."""
    with torch_threads(threads):
        return _validation_accuracy(config, generation_config, weights, task_names)


def _validation_accuracy(config, generation_config, weights: dict, task_names: list[str]) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    quiet_libraries()
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.generation_config = generation_config
    model.load_state_dict(weights)
    model.float()
    tokenizer = build_tokenizer()
    out = {}
    for name in task_names:
        t = get_task(name)
        out[name] = greedy_accuracy(model, tokenizer, t.split("validation"), t.max_answer_chars + 1)["accuracy"]
    return out


@dataclass(frozen=True)
class SampleSpec:
    task: str
    k: int = 4
    max_prompts: int = 8000
    seed: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def settings_line(self) -> str:
        return f"{self.k} samples/prompt from θ0 at temperature 1 on {self.task} training prompts"


def run_samples(
    spec: SampleSpec, base_dir: str | Path, out_dir: str | Path, *, progress: bool = True, overwrite: bool = False
):
    """``k`` samples per training prompt from θ0 at temperature 1: the data of DPO and rejection-sampling FT."""
    quiet_libraries()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    t_start = time.monotonic()
    task = get_task(spec.task)
    problems = ordered(task.split("train"), min(spec.max_prompts, len(task.split("train"))), spec.seed)
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir)
    dedupe_prefill(model)  # k samples of each prompt: prefill each prompt once (same bits)
    base_digest = model_digest(base_dir)
    fp = fingerprint({"samples": spec.to_json(), "base": base_digest})
    bar = StageProgress("samples", len(problems), enabled=progress)
    chunk = 1024
    raw: list[str] = []
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        raw += generate(
            model,
            tokenizer,
            [p.prompt for p in part],
            task.max_answer_chars + 1,
            sample=True,
            num_return_sequences=spec.k,
            generator_seed=spec.seed * 1_000_003 + start,
        )
        bar.update(start + len(part))
    bar.close()
    lines = []
    n_correct = n_any = n_mixed = 0
    for i, p in enumerate(problems):
        outs = raw[i * spec.k : (i + 1) * spec.k]
        correct = [is_correct(c, p.answer) for c in outs]
        n_correct += sum(correct)
        n_any += any(correct)
        n_mixed += any(correct) and not all(correct)
        lines.append(
            json.dumps(
                {
                    "prompt": p.prompt,
                    "answer": p.answer,
                    "completions": [normalise_completion(c) for c in outs],
                    "correct": correct,
                    "terminated": [EOS in c for c in outs],
                }
            )
        )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / "samples.jsonl", "\n".join(lines) + "\n")
        record = {
            "name": "samples",
            "kind": "samples",
            "fingerprint": fp,
            "spec": spec.to_json(),
            "settings": f"{spec.k} samples per prompt at temperature 1 from θ0 on {len(problems)} {spec.task} training prompts, seed {spec.seed}",
            "base": {"dir": str(base_dir), "digest": base_digest},
            "prompts": len(problems),
            "sample_accuracy": n_correct / (len(problems) * spec.k),
            "prompts_with_a_correct_sample": n_any,
            "prompts_with_correct_and_incorrect": n_mixed,
            "timings": {"total_s": time.monotonic() - t_start},
            "versions": library_versions(),
        }
        atomic_write_text(tmp / "stage.json", json.dumps(record, indent=2) + "\n")
    return StageResult(name="samples", dir=out_dir, record=record)
