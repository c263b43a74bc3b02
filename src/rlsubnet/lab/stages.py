"""Training stages: each is one of TRL's trainers (pinned in pyproject's ``train`` extra), run from θ0.

A stage trains fp32 master weights that start at θ0's bf16 values exactly, and writes into its own folder
(built under a temporary name and renamed at the end, so a stage is either complete or absent):

    stage.json                 spec, fingerprint, settings, data digest, timings, accuracy, library versions
    model/                     the final weights as a bf16 Hugging Face checkpoint (+ tokenizer): the measured model
    master-fp32.safetensors    the fp32 master weights at the end of training
    snapshots/step-NNNNNN.safetensors   bf16 weights every ``snapshot_every`` steps (the last one is the final model)
    steps.json                 per optimizer step: sparsity against the previous step (compare engine) and the
                               never / returned / final decomposition at one-step resolution
    data.jsonl                 the training rows in the order the trainer saw them
    log.jsonl                  the trainer's logs, one line per step

The subnetwork re-runs reuse :func:`run_stage`: pass the same spec (same ``seed`` and ``data_seed``, so
the same rows in the same order and the same sampling RNG), an ``optimizer_factory`` that wraps
:func:`rlsubnet.lab.trainers.default_optimizer` in a masked optimizer, and/or extra ``callbacks`` / a ``configure_trainer`` hook.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsubnet._version import __version__
from rlsubnet.diff.changed import ChangedTest
from rlsubnet.diff.dynamics import DecompositionTracker
from rlsubnet.diff.stats import atol_record
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_dir, atomic_write_text, locks_output, safe_member_name
from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.data import load_samples, stage_rows
from rlsubnet.lab.evaluate import greedy_accuracy
from rlsubnet.lab.model import load_model, save_model, save_weights_file, unique_state
from rlsubnet.lab.prefill import dedupe_prefill
from rlsubnet.lab.progress import StageProgress
from rlsubnet.lab.shared_prompts import share_prompts
from rlsubnet.lab.tasks import get_task
from rlsubnet.lab.tokenizer import load_tokenizer
from rlsubnet.lab.trainers import build_trainer, train_timed

# The train extra (transformers, trl, datasets, accelerate) is imported where it is used: `rlsubnet --help` and the
# library's own commands never need it.

STEP_ATOLS = (0.0, 1e-5)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_digest(model_dir: str | Path) -> str:
    """Identity of a checkpoint folder written by :func:`rlsubnet.lab.model.save_model` (its weights file)."""
    return file_digest(Path(model_dir) / "model.safetensors")


def library_versions() -> dict:
    import accelerate
    import datasets
    import transformers
    import trl

    return {
        "rlsubnet": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def quiet_libraries() -> None:
    """Keep the progress display readable: the libraries' own bars and advice go away, errors stay."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"trl\..*")
    warnings.filterwarnings("ignore", module=r"transformers\..*")
    warnings.filterwarnings("ignore", module=r"accelerate\..*")


# -- callbacks


def _bf16_state(model) -> dict:
    return unique_state(model, torch.bfloat16)


def make_callbacks(
    model,
    base_state: dict,
    *,
    snapshot_dir: Path,
    snapshot_every: int,
    total_steps: int,
    progress=None,
    step_atols: Sequence[float] = STEP_ATOLS,
):
    """(snapshots, per-step tracker, log collector) as TrainerCallbacks over ``model``'s parameters."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """bf16 weights every ``snapshot_every`` steps and at the last step (the final model)."""

        def __init__(self) -> None:
            self.saved: list[tuple[int, str]] = []

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if step % snapshot_every == 0 or step == total_steps or control.should_training_stop:
                self.save(step)

        def save(self, step: int) -> None:
            if self.saved and self.saved[-1][0] == step:
                return
            name = f"step-{step:06d}.safetensors"
            save_weights_file(_bf16_state(model), snapshot_dir / name, {"step": step, "dtype": "bfloat16"})
            self.saved.append((step, name))

    named = dict(model.named_parameters())
    tracked = [named[n] for n in base_state]

    def flat_bf16() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in tracked]).to(torch.bfloat16)

    class StepTracker(TrainerCallback):
        """After every optimizer step: the engine's changed-test against the previous step's bf16 weights, and the
        never / returned / final decomposition at one-step resolution (the last step is the final model)."""

        def __init__(self) -> None:
            # All parameters as one flat bf16 vector: the test is elementwise and the counts are pooled, so this
            # gives the per-tensor loop's numbers in a quarter of its time (16 -> 4.6 ms a step on the small model,
            # where an SFT step takes ~100 ms).
            base = torch.cat([t.reshape(-1) for t in base_state.values()])
            self.test = ChangedTest(base.dtype, base.dtype, step_atols, "bf16")
            self.prev = base
            self.decomposition = DecompositionTracker({"": base}, step_atols)
            self.numel = base.numel()
            self.records: list[dict] = []

        def on_step_end(self, args, state, control, **kw):
            cur = flat_bf16()
            changed = [int(np.count_nonzero(m)) for m in self.test.changed(self.prev, cur)]
            self.decomposition.update({"": cur})
            recs = [atol_record(a, self.numel, n) for a, n in zip(step_atols, changed)]
            self.records.append(
                {
                    "step": state.global_step,
                    "changed_vs_previous_step": {repr(g["atol"]): g["changed"] for g in recs},
                    "sparsity_vs_previous_step": {repr(g["atol"]): g["sparsity"] for g in recs},
                }
            )
            self.prev = cur

    class Logs(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []
            self._last: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
                self.logs.append(rec)
                self._last = rec

        def on_step_end(self, args, state, control, **kw):
            if progress is not None:
                progress.update(state.global_step, self._last)

    return Snapshots(), StepTracker(), Logs()


# -- running a stage


@dataclass
class StageResult:
    """Where a finished stage's outputs are, and its record (the content of stage.json)."""

    name: str
    dir: Path
    record: dict

    @property
    def model_dir(self) -> Path:
        """The bf16 checkpoint (a Hugging Face folder): what every sparsity figure measures."""
        return self.dir / "model"

    @property
    def master_path(self) -> Path:
        """The fp32 master weights at the end of training (one safetensors file)."""
        return self.dir / "master-fp32.safetensors"

    @property
    def snapshots(self) -> list[tuple[int, Path]]:
        where = f"{self.dir / 'stage.json'}: snapshot"
        return [
            (s["step"], self.dir / "snapshots" / safe_member_name(s["file"], where, UsageError))
            for s in self.record.get("snapshots", [])
        ]

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]

    @classmethod
    def load(cls, stage_dir: str | Path) -> StageResult:
        stage_dir = Path(stage_dir)
        with open(stage_dir / "stage.json") as f:
            record = json.load(f)
        return cls(name=record["name"], dir=stage_dir, record=record)


# GRPO's loss runs each prompt once for all its completions (rlsubnet.lab.shared_prompts): other bits than the full
# pass, so a GRPO stage finished before it is not reused.
GRPO_LOSS_FORWARD = {"loss_forward": "shared prompts"}


def stage_fingerprint(spec: StageSpec, base_digest: str, samples_digest: str | None, extra: dict | None = None) -> str:
    record = {"spec": spec.to_json(), "base": base_digest, "samples": samples_digest, "extra": extra or {}}
    return fingerprint({**record, **(GRPO_LOSS_FORWARD if spec.algorithm == "grpo" else {})})


def save_trained(model, folder: Path, tokenizer, stage: str, fp: str):
    """Write ``model/`` (bf16, with the tokenizer: the measured checkpoint) and ``master-fp32.safetensors`` into
    ``folder``; the bf16 model as saved, loaded back."""
    meta = {"stage": stage, "fingerprint": fp, "rlsubnet_version": __version__}
    save_model(model, folder / "model", torch.bfloat16, tokenizer=tokenizer, metadata=meta)
    save_weights_file(unique_state(model), folder / "master-fp32.safetensors", {**meta, "dtype": "float32"})
    return load_model(folder / "model")


def heldout_accuracy(bf16_model, master_model, tokenizer, task) -> dict:
    """Greedy accuracy on ``task``'s held-out split of the saved bf16 model and of the fp32 masters."""
    n_new = task.max_answer_chars + 1
    return {
        "bf16": greedy_accuracy(bf16_model, tokenizer, task.split("heldout"), n_new),
        "fp32_master": greedy_accuracy(master_model, tokenizer, task.split("heldout"), n_new),
        "heldout_digest": task.split_digest("heldout"),
    }


@locks_output("out_dir")
def run_stage(
    spec: StageSpec,
    *,
    base_dir: str | Path,
    out_dir: str | Path,
    samples_path: str | Path | None = None,
    eval_tasks: Sequence[str] | None = None,
    callbacks: Sequence = (),
    optimizer_factory: Callable | None = None,
    configure_trainer: Callable | None = None,
    after_train: Callable | None = None,
    extra_files: Callable[[Path], None] | None = None,
    extra_record: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> StageResult:
    """Train ``spec`` from the bf16 checkpoint ``base_dir`` (θ0) and write the stage folder ``out_dir``.

    ``callbacks`` are extra TrainerCallbacks; ``optimizer_factory(model, training_args) -> Optimizer`` replaces
    :func:`~rlsubnet.lab.trainers.default_optimizer` (a masked optimizer wraps the default one); ``configure_trainer(trainer)`` runs
    after the trainer is built and before it trains (e.g. a TRL plug-in); ``after_train(trainer) -> dict`` runs
    after training, and its dict is stored in stage.json as ``"after_train"`` (e.g. the masked optimizer's report),
    inside the stage's atomic write; ``extra_files(folder)`` then writes files of its own into the stage folder
    before it is published (e.g. a probe's statistics). ``extra_record`` is stored in stage.json and enters the fingerprint: record
    there what the hooks change (the mask file, its digest...).
    """
    quiet_libraries()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    t_start = time.monotonic()
    tokenizer = load_tokenizer(base_dir)
    samples = load_samples(samples_path) if spec.uses_own_samples and samples_path else None
    rows, data_record = stage_rows(spec, samples)
    base_digest = model_digest(base_dir)
    samples_digest = file_digest(samples_path) if samples is not None and samples_path is not None else None
    fp = stage_fingerprint(spec, base_digest, samples_digest, extra_record)
    eval_tasks = list(eval_tasks or [spec.task])

    model = load_model(base_dir)  # fp32 masters, equal to θ0's bf16 values
    base_state = _bf16_state(model)
    bar = StageProgress(spec.name, spec.steps, enabled=progress)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "snapshots").mkdir()
        snaps, tracker, logs = make_callbacks(
            model,
            base_state,
            snapshot_dir=tmp / "snapshots",
            snapshot_every=spec.snapshot_every,
            total_steps=spec.steps,
            progress=bar,
        )
        trainer = build_trainer(
            spec,
            model,
            tokenizer,
            rows,
            base_dir=base_dir,
            output_dir=tmp / "trainer",
            callbacks=[snaps, tracker, logs, *callbacks],
            optimizer_factory=optimizer_factory,
        )
        if spec.algorithm == "grpo":
            dedupe_prefill(trainer.model)  # 8 completions per prompt: prefill each prompt once (same bits)
            share_prompts(trainer.model)  # and run each prompt once in the loss (other bits: in the fingerprint)
        if configure_trainer is not None:
            configure_trainer(trainer)
        train_seconds = train_timed(trainer, tmp / "trainer", bar)
        after = after_train(trainer) if after_train is not None else None
        if extra_files is not None:
            extra_files(tmp)
        steps_done = trainer.state.global_step
        snaps.save(steps_done)  # the final model is always the last snapshot
        model = trainer.model
        bf16_model = save_trained(model, tmp, tokenizer, spec.name, fp)
        accuracy = {t: heldout_accuracy(bf16_model, model, tokenizer, get_task(t)) for t in eval_tasks}
        steps_record = {
            "atols": list(STEP_ATOLS),
            "steps": tracker.records,
            "decomposition_every_step": [c.to_record() for c in tracker.decomposition.counts()],
        }
        atomic_write_text(tmp / "steps.json", json.dumps(steps_record, indent=1) + "\n")
        atomic_write_text(tmp / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(tmp / "log.jsonl", "".join(json.dumps(r) + "\n" for r in logs.logs))
        record = {
            "name": spec.name,
            "kind": "finetune",
            "fingerprint": fp,
            "spec": spec.to_json(),
            "settings": spec.settings_line(),
            "base": {"dir": str(base_dir), "digest": base_digest},
            "samples": {"path": str(samples_path), "digest": samples_digest} if samples_digest else None,
            "data": data_record,
            "trainer": type(trainer).__name__,
            "optimizer": _describe_optimizer(trainer.optimizer),
            "steps_done": steps_done,
            "snapshots": [{"step": s, "file": f} for s, f in snaps.saved],
            "accuracy": accuracy,
            "train_summary": _train_summary(logs.logs),
            "timings": {"train_s": train_seconds, "total_s": time.monotonic() - t_start},
            "versions": library_versions(),
            "extra": extra_record or {},
        }
        if after is not None:
            record["after_train"] = after
        atomic_write_text(tmp / "stage.json", json.dumps(record, indent=2) + "\n")
    return StageResult(name=spec.name, dir=out_dir, record=record)


def _describe_optimizer(opt) -> dict:
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
    d: dict[str, Any] = {"class": f"{type(inner).__module__}.{type(inner).__qualname__}"}
    if getattr(inner, "param_groups", None):
        g = inner.param_groups[0]
        d.update({k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "foreach", "fused") if k in g})
        d["betas"] = list(d.get("betas", ()))
    return d


def _train_summary(logs: Sequence[dict]) -> dict:
    """First and last logged values of the metrics that say whether training did anything."""
    out = {}
    for key in (
        "reward",
        "loss",
        "grad_norm",
        "kl",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "mean_token_accuracy",
    ):
        vals = [r[key] for r in logs if isinstance(r.get(key), (int, float))]
        if vals:
            k = max(1, len(vals) // 10)
            out[key] = {
                "first": vals[0],
                "last": vals[-1],
                "first_10pct_mean": sum(vals[:k]) / k,
                "last_10pct_mean": sum(vals[-k:]) / k,
            }
    return out
