"""The demo: reproduce the paper's measurements on a tiny language model, offline, with TRL's trainers.

    rlsubnet demo --out runs/demo                 # size small (~1M parameters), the default
    rlsubnet demo --out runs/micro --size micro --steps 4

θ0 (pretraining) and its samples come first; then the finetuning stages, the extra-seed full runs and
the masked re-runs (:mod:`rlsubnet.lab.subnet`), ``--jobs`` at a time in worker processes, each re-run
as soon as its full run has finished. Each stage writes ``OUT/stages/<name>/`` atomically, so an interrupted run
resumes from the last finished stages and a re-run reuses every stage whose fingerprint (settings + inputs, the
mask's bits for a masked stage) still matches. ``OUT/run.json`` records the configuration: a folder holding another
configuration's results is refused unless ``--fresh``. The masks (``OUT/masks/``), the measurements and the report
are recomputed on every run (seconds); the training is not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlsubnet import limits
from rlsubnet._version import __version__
from rlsubnet.errors import RlsubnetError, UsageError
from rlsubnet.fileio import atomic_write_text, output_lock, temporaries_in
from rlsubnet.lab.tasks import get_task

# Per-size defaults; every one can be overridden from the command line.
SIZE_DEFAULTS = {
    "micro": dict(steps=4, batch_size=8, num_generations=8, snapshot_every=2, pretrain_max_steps=300,
                  pretrain_eval_every=50, pretrain_target=0.05, pretrain_lr=5e-3, pretrain_batch=64, sample_prompts=512),
    "small": dict(steps=100, batch_size=32, num_generations=8, snapshot_every=10, pretrain_max_steps=2000,
                  pretrain_eval_every=50, pretrain_target=0.6, pretrain_lr=2e-3, pretrain_batch=64, sample_prompts=8000),
    "medium": dict(steps=100, batch_size=32, num_generations=8, snapshot_every=10, pretrain_max_steps=3000,
                   pretrain_eval_every=50, pretrain_target=0.6, pretrain_lr=1e-3, pretrain_batch=64, sample_prompts=8000),
}


@dataclass(frozen=True)
class DemoConfig:
    """The whole run. Two runs with equal configs compute the same numbers (on the same machine and threads)."""

    size: str = field(default="small", metadata={"help": "model size: micro (tests), small (~1M), medium (~4M)"})
    task: str = field(default="add", metadata={"help": "task of every stage's training set"})
    second_task: str | None = field(default="sub", metadata={"help": "second training set (a different task); None: none"})
    seed: int = 0
    threads: int = field(default=1, metadata={"help": "torch CPU threads; part of the config because the thread count "
                                                      "changes floating-point reduction order, hence the numbers"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps of every finetuning stage"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts / pairs / examples per step"})
    rl_lr: float = field(default=1e-6, metadata={"help": "learning rate of GRPO and DPO (TRL's default)"})
    sft_lr: float = field(default=1e-5, metadata={"help": "usual SFT learning rate"})
    kl_beta: float = field(default=0.04, metadata={"help": "KL coefficient of the GRPO-with-KL stage"})
    dpo_beta: float = 0.1
    clip: float = field(default=1.0, metadata={"help": "max gradient norm (every stage but grpo-noclip)"})
    num_generations: int | None = None
    snapshot_every: int | None = None
    samples_per_prompt: int = 4
    sample_prompts: int | None = None
    pretrain_target: float | None = None
    pretrain_max_steps: int | None = None
    pretrain_eval_every: int | None = None
    pretrain_lr: float | None = None
    pretrain_batch: int | None = None

    def __post_init__(self):
        from rlsubnet.lab.model import model_size

        model_size(self.size)
        get_task(self.task)
        if self.second_task is not None:
            get_task(self.second_task)
            if self.second_task == self.task:
                raise UsageError("--second-task must differ from --task")
        limits.seed(self.seed, "--seed")
        for name, hi in (("threads", limits.MAX_THREADS), ("steps", limits.MAX_STEPS), ("batch_size", limits.MAX_BATCH),
                         ("num_generations", limits.MAX_GENERATIONS), ("snapshot_every", limits.MAX_STEPS),
                         ("sample_prompts", limits.MAX_STEPS), ("pretrain_max_steps", limits.MAX_STEPS),
                         ("pretrain_eval_every", limits.MAX_STEPS), ("pretrain_batch", limits.MAX_BATCH),
                         ("samples_per_prompt", limits.MAX_GENERATIONS)):
            v = getattr(self, name)
            if v is not None:
                limits.integer(v, f"--{name.replace('_', '-')}", 1, hi)
        for name in ("rl_lr", "sft_lr", "dpo_beta") + (("pretrain_lr",) if self.pretrain_lr is not None else ()):
            limits.real(getattr(self, name), f"--{name.replace('_', '-')}", lo_open=True)
        for name in ("kl_beta", "clip"):
            limits.real(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.pretrain_target is not None:
            limits.real(self.pretrain_target, "--pretrain-target", 0.0, 1.0)
        if self.samples_per_prompt < 2:
            raise UsageError("--samples-per-prompt must be at least 2 (DPO needs a correct and an incorrect sample)")

    def resolved(self) -> "DemoConfig":
        """The config with every per-size default filled in (what run.json records)."""
        d = SIZE_DEFAULTS[self.size]
        return dataclasses.replace(self, **{k: d[k] for k in d if getattr(self, k) is None})

    def to_json(self) -> dict:
        return dataclasses.asdict(self.resolved())

    @property
    def tasks(self) -> list[str]:
        return [self.task] + ([self.second_task] if self.second_task else [])


def pretrain_spec(cfg: DemoConfig):
    from rlsubnet.lab.pretrain import PretrainSpec

    c = cfg.resolved()
    return PretrainSpec(size=c.size, tasks=tuple(c.tasks), seed=c.seed, learning_rate=c.pretrain_lr,
                        batch_size=c.pretrain_batch, max_steps=c.pretrain_max_steps, eval_every=c.pretrain_eval_every,
                        target_accuracy=c.pretrain_target)


def sample_spec(cfg: DemoConfig):
    from rlsubnet.lab.pretrain import SampleSpec

    c = cfg.resolved()
    return SampleSpec(task=c.task, k=c.samples_per_prompt, max_prompts=c.sample_prompts, seed=c.seed)


def finetune_specs(cfg: DemoConfig) -> list:
    """The finetuning stages, all from θ0 with the same steps, batch, seed and data seed."""
    from rlsubnet.lab.stages import StageSpec

    c = cfg.resolved()
    common = dict(task=c.task, steps=c.steps, batch_size=c.batch_size, seed=c.seed, snapshot_every=c.snapshot_every,
                  num_generations=c.num_generations)
    specs = [
        StageSpec("grpo", "grpo", data="prompts", learning_rate=c.rl_lr, beta=0.0, max_grad_norm=c.clip,
                  description="GRPO, exact-match reward, no KL term, gradient clipping", **common),
        StageSpec("grpo-kl", "grpo", data="prompts", learning_rate=c.rl_lr, beta=c.kl_beta, max_grad_norm=c.clip,
                  description="GRPO with the KL term", **common),
        StageSpec("grpo-noclip", "grpo", data="prompts", learning_rate=c.rl_lr, beta=0.0, max_grad_norm=0.0,
                  description="GRPO without gradient clipping", **common),
        StageSpec("grpo-sftlr", "grpo", data="prompts", learning_rate=c.sft_lr, beta=0.0, max_grad_norm=c.clip,
                  description="GRPO at the usual SFT learning rate (the matched-lr control, from the RL side)", **common),
        StageSpec("dpo", "dpo", data="own-pairs", learning_rate=c.rl_lr, beta=c.dpo_beta, max_grad_norm=c.clip,
                  description="DPO on θ0's own correct vs incorrect samples", **common),
        StageSpec("sft", "sft", data="gold", learning_rate=c.sft_lr, max_grad_norm=c.clip,
                  description="SFT on reference answers at a usual SFT learning rate", **common),
        StageSpec("sft-matched", "sft", data="gold", learning_rate=c.rl_lr, max_grad_norm=c.clip,
                  description="SFT on reference answers at the RL learning rate (matched-lr control)", **common),
        StageSpec("rft", "sft", data="own-correct", learning_rate=c.sft_lr, max_grad_norm=c.clip,
                  description="rejection-sampling FT: SFT on θ0's own correct samples, usual SFT lr", **common),
        StageSpec("rft-matched", "sft", data="own-correct", learning_rate=c.rl_lr, max_grad_norm=c.clip,
                  description="rejection-sampling FT at the RL learning rate", **common),
    ]
    if c.second_task:
        specs.append(StageSpec(f"grpo-task-{c.second_task}", "grpo", data="prompts", learning_rate=c.rl_lr, beta=0.0,
                               max_grad_norm=c.clip, description=f"GRPO on the second training set ({c.second_task})",
                               **{**common, "task": c.second_task}))
    return specs


# -- the output folder

OUR_ENTRIES = ("run.json", "stages", "masks", "figures", "report.md", "results.json", ".lock")


class RunFolder:
    """OUT: refuses foreign content and other configurations, cleans up after interrupted runs, and locks
    itself so that two demos cannot write the same folder at once."""

    def __init__(self, out: str | Path, cfg: DemoConfig, fresh: bool):
        self.out = Path(out)
        self.cfg = cfg
        self.fresh = fresh
        self._lock = None

    def __enter__(self):
        out = self.out
        self._acquire_lock()
        try:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out}: exists and is not a folder")
            run_json = out / "run.json"
            if out.is_dir() and any(out.iterdir()) and not run_json.is_file():
                raise UsageError(f"--out {out}: folder is not empty and holds no demo run (no run.json); choose another folder")
            out.mkdir(parents=True, exist_ok=True)
            if run_json.is_file():
                try:
                    previous = json.loads(run_json.read_text())["config"]
                except (ValueError, KeyError) as exc:
                    raise UsageError(f"{run_json}: unreadable ({exc}); rerun with --fresh to start over") from None
                current = self.cfg.to_json()
                if previous != current and not self.fresh:
                    diff = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(previous) | set(current))
                                     if previous.get(k) != current.get(k))
                    raise UsageError(f"--out {out} holds the results of another configuration ({diff}); "
                                     "pass --fresh to replace them or choose another folder")
            if self.fresh:
                for name in OUR_ENTRIES:
                    if name == ".lock":
                        continue
                    p = out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            self._remove_stale_temporaries()
            record = {"rlsubnet_version": __version__, "config": self.cfg.to_json()}
            atomic_write_text(run_json, json.dumps(record, indent=2) + "\n")
            (out / "stages").mkdir(exist_ok=True)
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc):
        self._release_lock()

    def _acquire_lock(self):
        # Not re-entrant: a second demo on the same folder is refused even inside this process.
        lock = output_lock(self.out, reentrant=False)
        lock.__enter__()
        self._lock = lock

    def _release_lock(self):
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _remove_stale_temporaries(self):
        # A killed run leaves its temporaries (".NAME.XXXXXXXX.tmp", ".NAME.old-PID") beside the outputs it
        # was writing; everything in these folders is one of the demo's outputs.
        for parent in (self.out, self.out / "stages", self.out / "masks", self.out / "figures"):
            for p in temporaries_in(parent):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name


def _finished(stage_dir: Path, expected_fp: str, fresh: bool):
    """The stage's result if it finished with the expected fingerprint, None if it must run."""
    from rlsubnet.lab.stages import StageResult

    if not (stage_dir / "stage.json").is_file():
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # not ours to trust: a stage folder without its record
        return None
    result = StageResult.load(stage_dir)
    if result.fingerprint == expected_fp:
        return result
    if fresh:
        shutil.rmtree(stage_dir)
        return None
    raise RlsubnetError(
        f"{stage_dir}: made with other settings or inputs (fingerprint {result.fingerprint}, expected {expected_fp}); "
        "rerun with --fresh"
    )


def _cpu_seconds() -> float:
    return time.process_time()


@dataclass(frozen=True)
class StageJob:
    """One stage to run, picklable so that a worker process can run it: the spec, what enters its fingerprint
    beyond the spec, and for a masked stage the mask file (and the SHA-256 of its bits, checked on load)."""

    spec: object
    extra_record: dict | None = None
    mask_path: str | None = None
    mask_sha256: str | None = None
    allow_full: bool = False


def execute_job(job: StageJob, kwargs: dict):
    """Run ``job`` in this process (``kwargs``: the rest of :func:`rlsubnet.lab.stages.run_stage`'s arguments)."""
    from rlsubnet.lab import stages

    if job.mask_path is not None:
        from rlsubnet.lab.subnet import run_masked_stage

        return run_masked_stage(job.spec, mask_path=job.mask_path, mask_sha256=job.mask_sha256,
                                allow_full=job.allow_full, extra_record=job.extra_record, **kwargs)
    return stages.run_stage(job.spec, extra_record=job.extra_record, **kwargs)


@dataclass
class PlannedStage:
    """A stage of the plan: its job, known up front, or ``prepare(done) -> StageJob | str`` called once the stages
    it ``needs`` have finished (a masked re-run needs the full run's mask); a str means skipped, and says why."""

    name: str
    job: StageJob | str | None = None
    needs: tuple[str, ...] = ()
    prepare: object = None


@dataclass
class StageContext:
    """What every finetuning stage of one demo run shares; :meth:`stage` runs a stage or reuses its folder,
    :meth:`run_plan` runs many, in worker processes when ``jobs`` > 1.

    Whatever a hook changes must be described in ``extra_record``, which enters the fingerprint, so that a
    finished stage is reused only for the same mask and options.
    """

    folder: RunFolder
    theta0: Path
    base_digest: str
    samples_path: Path
    samples_digest: str
    eval_tasks: list
    theta0_accuracy: dict
    timings: dict
    fresh: bool = False
    progress: bool = True
    jobs: int = 1
    threads: int = 1

    def _kwargs(self, spec, progress: bool) -> dict:
        own = spec.uses_own_samples
        return dict(base_dir=self.theta0, out_dir=self.folder.stage_dir(spec.name),
                    samples_path=self.samples_path if own else None, eval_tasks=list(self.eval_tasks), progress=progress)

    def lookup(self, spec, extra_record: dict | None = None):
        """The finished stage if its folder holds this spec's result for these inputs, else None."""
        from rlsubnet.lab.stages import stage_fingerprint

        sdig = self.samples_digest if spec.uses_own_samples else None
        expected = stage_fingerprint(spec, self.base_digest, sdig, extra_record)
        return _finished(self.folder.stage_dir(spec.name), expected, self.fresh)

    def stage(self, spec, *, extra_record: dict | None = None, **hooks):
        """Run ``spec`` here (hooks as for :func:`rlsubnet.lab.stages.run_stage`), or reuse its finished folder."""
        from rlsubnet.lab.progress import say
        from rlsubnet.lab.stages import run_stage

        res = self.lookup(spec, extra_record)
        t0, c0 = time.monotonic(), _cpu_seconds()
        if res is None:
            res = run_stage(spec, extra_record=extra_record, **self._kwargs(spec, self.progress), **hooks)
            self.timings[spec.name] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        else:
            self.timings[spec.name] = {"reused": True}
        say(self._result_line(res), self.progress)
        return res

    def _result_line(self, res, label: str = "") -> str:
        accs = ", ".join(
            f"{t} {self.theta0_accuracy[t]['bf16']['accuracy']:.1%} -> {v['bf16']['accuracy']:.1%}"
            for t, v in res.record["accuracy"].items()
        )
        return f"    {label}held-out accuracy {accs}" + _time_note(self.timings[res.name])

    def run_plan(self, plan: list, *, first_number: int, total: int) -> tuple[dict, dict]:
        """Run every stage of ``plan`` (in order, each once the stages it needs are done), reusing finished ones;
        ``jobs`` > 1 runs that many at a time in worker processes (spawned; one torch thread count each).
        Returns ({name: StageResult}, {name: why skipped})."""
        from rlsubnet.lab.progress import say

        done: dict = {}
        skipped: dict[str, str] = {}
        pending = list(plan)
        number = {node.name: first_number + i for i, node in enumerate(plan)}
        running: dict = {}
        pool = None

        def header(node, note=""):
            say(f"[{number[node.name]}/{total}] {node.name}: {node.job.spec.settings_line()}{note}", self.progress)

        try:
            while pending or running:
                progressed = False
                for node in list(pending):
                    if any(n not in done and n not in skipped for n in node.needs):
                        continue
                    if node.job is None:
                        missing = [n for n in node.needs if n in skipped]
                        node.job = (f"needs {', '.join(missing)}, which did not run" if missing else node.prepare(done))
                    if isinstance(node.job, str):
                        pending.remove(node)
                        skipped[node.name] = node.job
                        say(f"[{number[node.name]}/{total}] {node.name}: skipped ({node.job})", self.progress)
                        progressed = True
                        continue
                    job = node.job
                    if self.jobs == 1:
                        pending.remove(node)
                        header(node)
                        done[node.name] = self._run_here(job)
                        progressed = True
                        break  # rescan in plan order: the stage may have unblocked others
                    res = self.lookup(job.spec, job.extra_record)
                    if res is not None:
                        pending.remove(node)
                        done[node.name] = res
                        self.timings[node.name] = {"reused": True}
                        header(node)
                        say(self._result_line(res), self.progress)
                        progressed = True
                        continue
                    if len(running) >= self.jobs:
                        continue
                    if pool is None:
                        pool = _worker_pool(self.jobs, self.threads)
                    pending.remove(node)
                    header(node, f"  (started in a worker process; {len(running) + 1} running)")
                    running[pool.submit(_worker_run, job, self._kwargs(job.spec, False))] = node
                    progressed = True
                if self.jobs == 1 or not running:
                    if pending and not progressed:
                        raise RlsubnetError(f"cannot schedule {', '.join(n.name for n in pending)}: unmet needs")
                    continue
                from concurrent.futures import FIRST_COMPLETED, wait

                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    node = running.pop(fut)
                    res, timing = fut.result()
                    done[node.name] = res
                    self.timings[node.name] = timing
                    say(self._result_line(res, f"{node.name}: "), self.progress)
        except BaseException:
            if pool is not None:
                _stop_pool(pool)
                pool = None
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return done, skipped

    def _run_here(self, job: StageJob):
        from rlsubnet.lab.progress import say

        res = self.lookup(job.spec, job.extra_record)
        t0, c0 = time.monotonic(), _cpu_seconds()
        if res is None:
            res = execute_job(job, self._kwargs(job.spec, self.progress))
            self.timings[job.spec.name] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        else:
            self.timings[job.spec.name] = {"reused": True}
        say(self._result_line(res), self.progress)
        return res


# -- worker processes (jobs > 1)

_IN_JOB = False


def _worker_pool(jobs: int, threads: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent has torch (and its thread pools) initialised, which fork does not survive safely.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))


def _worker_init(threads: int) -> None:
    import os
    import signal

    # The parent decides when to stop: Ctrl-C reaches it, and it stops the workers with SIGTERM, which interrupts a
    # running stage the way Ctrl-C does (its temporary folder is removed) and ends an idle worker quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_stop)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def _worker_stop(signum, frame):
    import os

    if _IN_JOB:
        raise KeyboardInterrupt
    os._exit(1)


def _worker_run(job: StageJob, kwargs: dict):
    global _IN_JOB
    import os

    from rlsubnet.lab.stages import quiet_libraries

    quiet_libraries()
    t0, c0 = time.monotonic(), _cpu_seconds()
    _IN_JOB = True
    try:
        res = execute_job(job, kwargs)
    finally:
        _IN_JOB = False
    return res, {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False, "worker_pid": os.getpid()}


def _stop_pool(pool) -> None:
    """Interrupt the running stages (each removes its temporary folder) and wait for the workers to end."""
    import os
    import signal

    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except Exception:  # noqa: BLE001 - a broken pool is expected here
        pass


def default_jobs(threads: int = 1) -> int:
    """Stages run at once by default: one per CPU core the thread count leaves, at most 4."""
    import os

    return max(1, min(4, (os.cpu_count() or 1) // max(1, threads)))


def stage_plan(cfg: DemoConfig, specs: list, prepare_rerun) -> list[PlannedStage]:
    """Every finetuning stage of the run, in the order they start: the finetuning stages, the extra-seed full runs and
    the masked re-runs (``prepare_rerun(of, kind, done)`` makes their jobs once the full run ``of`` has finished).

    GRPO stages come first (they are the long ones), ``grpo`` and ``dpo`` before all (the re-runs wait for
    them), SFT stages last, so that with two workers the short stages fill the end; with one, order does not
    matter. No stage's result depends on the order or on which process ran it."""
    import functools

    from rlsubnet.lab import subnet

    spec_by_name = {s.name: s for s in specs}
    plan = [PlannedStage(s.name, job=StageJob(s)) for s in [*specs, *subnet.extra_seed_specs(spec_by_name)]]
    for of in subnet.RERUN_OF:
        if of in spec_by_name:
            for kind in ("subnet", "random"):
                plan.append(PlannedStage(f"{of}-{kind}", needs=(of,), prepare=functools.partial(prepare_rerun, of, kind)))
    algo = {**{s.name: s.algorithm for s in specs}, **{f"{of}-{k}": spec_by_name[of].algorithm
                                                       for of in subnet.RERUN_OF if of in spec_by_name for k in ("subnet", "random")}}
    for node in plan:
        if isinstance(node.job, StageJob):
            algo[node.name] = node.job.spec.algorithm

    def priority(node):
        if node.name in subnet.RERUN_OF:
            return 0
        return {"grpo": 1, "dpo": 2, "sft": 3}[algo[node.name]]

    return sorted(plan, key=priority)


def stage_order(cfg: DemoConfig) -> list[str]:
    """The names of :func:`stage_plan`, in order (for tests and docs)."""
    return [n.name for n in stage_plan(cfg.resolved(), finetune_specs(cfg), lambda *a: "")]


class MaskStore:
    """The masks of the subnetwork phase, built once per run from θ0 and the finished stages, saved under
    ``OUT/masks/`` (each a ``rlsubnet mask`` file: usable with ``rlsubnet overlap`` and ``rlsubnet train --mask``)."""

    def __init__(self, out: Path, theta0: Path, seed: int):
        self.dir = out / "masks"
        self.theta0 = theta0
        self.seed = seed
        self.masks: dict = {}
        self.paths: dict[str, Path] = {}

    def _save(self, key: str, mask, filename: str):
        self.dir.mkdir(exist_ok=True)
        path = self.dir / filename
        mask.save(path)
        self.masks[key], self.paths[key] = mask, path
        return mask

    def changed(self, name: str, stage):
        """Entries of ``stage``'s bf16 checkpoint that differ from θ0 at atol 1e-5."""
        if name not in self.masks:
            from rlsubnet.lab.subnet import build_stage_mask

            self._save(name, build_stage_mask(self.theta0, stage), f"{name}.mask.safetensors")
        return self.masks[name]

    def random_like(self, name: str, stage):
        """A random per-tensor mask with exactly the counts of ``name``'s mask in every tensor (seed: the run's)."""
        from rlsubnet.lab.subnet import RANDOM_SCOPE, random_mask_label
        from rlsubnet.masks import random_mask

        key = random_mask_label(name)
        if key not in self.masks:
            self._save(key, random_mask(self.changed(name, stage), scope=RANDOM_SCOPE, seed=self.seed),
                       f"random-like-{name}.mask.safetensors")
        return self.masks[key]


def plan_rerun(store: MaskStore, spec_by_name: dict, of: str, kind: str, done: dict) -> StageJob | str:
    """The job of the masked re-run ``of``-``kind`` (kind "subnet": on the full run's own mask; "random": on a random
    mask of equal density), made once the full run ``of`` is in ``done``; a str (why) when there is nothing to re-run."""
    from rlsubnet.lab import subnet

    full = done[of]
    mask = store.changed(of, full)
    if mask.changed == 0:
        return (f"`{of}` changed no bf16 entry at atol {subnet.MASK_ATOL:g}: its subnetwork is empty, there is "
                "nothing to re-run")
    use = mask if kind == "subnet" else store.random_like(of, full)
    role = "subnetwork of the full run" if kind == "subnet" else f"random {subnet.RANDOM_SCOPE} mask of equal density"
    key = of if kind == "subnet" else subnet.random_mask_label(of)
    return StageJob(subnet.rerun_spec(spec_by_name[of], kind), extra_record=subnet.mask_extra_record(use, role, of),
                    mask_path=str(store.paths[key]), mask_sha256=use.bits_sha256(), allow_full=use.changed == use.numel)


def run_demo(cfg: DemoConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, jobs: int | None = None) -> dict:
    """Run (or resume) the whole demo and write the report; returns the results dict (results.json).

    ``jobs``: finetuning stages run at once, each in its own worker process (default :func:`default_jobs`);
    it changes the wall time, never a number."""
    import os

    from rlsubnet.lab.progress import say
    from rlsubnet.lab.stages import file_digest, fingerprint, model_digest, quiet_libraries

    import torch

    cfg = cfg.resolved()
    jobs = default_jobs(cfg.threads) if jobs is None else limits.integer(jobs, "--jobs", 1, limits.MAX_JOBS)
    t_run, c_run = time.monotonic(), _cpu_seconds()
    load_start = os.getloadavg()
    # One thread by default: on a shared 2-core machine two OpenMP threads wait on each other far longer than they
    # save (we measured 3-7x slower steps under load), and a fixed count keeps the numbers reproducible.
    torch.set_num_threads(cfg.threads)
    quiet_libraries()
    with RunFolder(out, cfg, fresh) as folder:
        pre_spec, smp_spec, specs = pretrain_spec(cfg), sample_spec(cfg), finetune_specs(cfg)
        spec_by_name = {s.name: s for s in specs}
        n_plan = len(stage_order(cfg))
        n_total = 2 + n_plan
        timings: dict[str, dict] = {}
        say(f"rlsubnet demo: size {cfg.size}, task {cfg.task}"
            + (f" (+ {cfg.second_task})" if cfg.second_task else "")
            + f", seed {cfg.seed}, {n_plan} finetuning stages of {cfg.steps} steps, {jobs} at a time -> {folder.out}", progress)

        def header(k: int, name: str, settings: str):
            say(f"[{k}/{n_total}] {name}: {settings}", progress)

        # 1. θ0
        from rlsubnet.lab.pretrain import run_pretrain, run_samples

        pre_dir = folder.stage_dir("pretrain")
        header(1, "pretrain", pre_spec.settings_line())
        pre = _finished(pre_dir, fingerprint({"pretrain": pre_spec.to_json()}), fresh)
        t0, c0 = time.monotonic(), _cpu_seconds()
        if pre is None:
            pre = run_pretrain(pre_spec, pre_dir, progress=progress)
            timings["pretrain"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        else:
            timings["pretrain"] = {"reused": True}
        acc = ", ".join(f"{t} {v['bf16']['accuracy']:.1%}" for t, v in pre.record["accuracy"].items())
        status = "reached" if pre.record["target_reached"] else "NOT reached"
        say(f"    θ0 after {pre.record['steps_done']} steps (target {status}); held-out accuracy {acc}"
            + _time_note(timings["pretrain"]), progress)
        theta0 = pre.model_dir
        base_digest = model_digest(theta0)

        # 2. θ0's own samples (for DPO and rejection-sampling FT)
        smp_dir = folder.stage_dir("samples")
        header(2, "samples", f"{smp_spec.k} samples/prompt from θ0 at temperature 1 on {cfg.task} training prompts")
        smp = _finished(smp_dir, fingerprint({"samples": smp_spec.to_json(), "base": base_digest}), fresh)
        t0, c0 = time.monotonic(), _cpu_seconds()
        if smp is None:
            smp = run_samples(smp_spec, theta0, smp_dir, progress=progress)
            timings["samples"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        else:
            timings["samples"] = {"reused": True}
        say(f"    sample accuracy {smp.record['sample_accuracy']:.1%}; {smp.record['prompts_with_a_correct_sample']} prompts "
            f"with a correct sample, {smp.record['prompts_with_correct_and_incorrect']} with both" + _time_note(timings["samples"]), progress)
        samples_path = smp.dir / "samples.jsonl"
        samples_digest = file_digest(samples_path)

        # 3. finetuning stages, then the extra seeds and masked re-runs (the paper's Tables 3, 4)
        from rlsubnet.lab import subnet

        ctx = StageContext(folder=folder, theta0=theta0, base_digest=base_digest, samples_path=samples_path,
                           samples_digest=samples_digest, eval_tasks=cfg.tasks, theta0_accuracy=pre.record["accuracy"],
                           timings=timings, fresh=fresh, progress=progress, jobs=jobs, threads=cfg.threads)
        store = MaskStore(folder.out, theta0, cfg.seed)

        import functools

        t0, c0 = time.monotonic(), _cpu_seconds()
        plan = stage_plan(cfg, specs, functools.partial(plan_rerun, store, spec_by_name))
        done, skipped = ctx.run_plan(plan, first_number=3, total=n_total)
        timings["finetuning_phase"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "jobs": jobs,
                                       "phase": True}
        stages = {s.name: done[s.name] for s in specs}
        extra = {n.name: done[n.name] for n in plan if n.name in done and n.name not in stages}

        # 4. measurements and report
        say(f"[measure] compare engine on {len(stages)} stages (bf16 and fp32, snapshots, dynamics)", progress)
        t0, c0 = time.monotonic(), _cpu_seconds()
        from rlsubnet.lab.measure import measure_stage

        measured = {name: measure_stage(theta0, res) for name, res in stages.items()}
        timings["measure"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        say("[subnetworks] masks, identity with θ_full, frozen fp32 masters, overlap against both chances", progress)
        t0, c0 = time.monotonic(), _cpu_seconds()
        extra_specs = {n.name: n.job.spec for n in plan if isinstance(n.job, StageJob)}
        subnetwork = subnet.measure(theta0, folder.out, stages, extra, extra_specs, store, skipped, cfg)
        timings["subnetwork"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}

        results = {
            "rlsubnet_version": __version__,
            "config": cfg.to_json(),
            "theta0": {"dir": str(theta0), "digest": base_digest, **{k: pre.record[k] for k in (
                "settings", "parameters", "steps_done", "target_reached", "reached_at_step", "curve", "accuracy", "spec")}},
            "samples": {k: smp.record[k] for k in ("settings", "prompts", "sample_accuracy", "prompts_with_a_correct_sample",
                                                     "prompts_with_correct_and_incorrect")},
            "stages": {
                name: {
                    "spec": res.record["spec"],
                    "settings": res.record["settings"],
                    "description": specs[[s.name for s in specs].index(name)].description,
                    "trainer": res.record["trainer"],
                    "optimizer": res.record["optimizer"],
                    "data": res.record["data"],
                    "accuracy": res.record["accuracy"],
                    "train_summary": res.record["train_summary"],
                    "stage_timings": res.record["timings"],
                    **measured[name],
                }
                for name, res in stages.items()
            },
            "subnetwork": subnetwork,
            "versions": pre.record["versions"],
            "timings": timings,
            "machine": {"cpu_count": os.cpu_count(), "jobs": jobs, "threads_per_stage": cfg.threads,
                        "loadavg_start": list(load_start)},
        }
        say("[report] figures, results.json, report.md", progress)
        t0, c0 = time.monotonic(), _cpu_seconds()
        from rlsubnet.report.demo_report import prepare_report, write_report

        figures = prepare_report(results)
        timings["report"] = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_seconds() - c0, "reused": False}
        worker_cpu = sum(t.get("cpu_s", 0.0) for t in timings.values() if "worker_pid" in t)
        timings["total"] = {"wall_s": time.monotonic() - t_run, "cpu_s": _cpu_seconds() - c_run + worker_cpu}
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        write_report(results, folder.out, figures)
        from rlsubnet.report.demo_report import summary_lines

        for line in summary_lines(results, results["claims"]):
            say(line, progress)
        say(f"done in {timings['total']['wall_s']:.0f} s: {folder.out / 'report.md'}", progress)
        return results


def _time_note(t: dict) -> str:
    if t.get("reused"):
        return "  (reused)"
    return f"  ({t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s cpu)"


