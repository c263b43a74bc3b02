"""Running the finetuning stages of a plan: each once the stages it needs are done, reusing finished ones, ``jobs``
at a time in spawned worker processes (one torch thread count each). Which process runs a stage never changes a
number: same spec, same inputs, same thread count, same bits.

θ0's samples are a node of the plan too (only the stages trained on them wait for them), and a worker that has
trained a stage also measures it (:func:`rlsubnet.lab.spectrum.measure_finished`), so that neither waits for a
core while the other one idles. The workers (:class:`WorkerPool`) can be started before the plan, during
pretraining, which uses one core and hands its validation checks to them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlsubnet.errors import RlsubnetError
from rlsubnet.lab import stages
from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.pretrain import SampleSpec, run_samples
from rlsubnet.lab.progress import say
from rlsubnet.lab.runfolder import RunFolder
from rlsubnet.lab.subnet import run_masked_stage


class Stopwatch:
    """Wall and CPU time since it was made, as a timing record of results.json."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.monotonic(), time.process_time()

    def record(self, **extra) -> dict:
        return {"wall_s": time.monotonic() - self.t0, "cpu_s": time.process_time() - self.c0, **extra}


def time_note(t: dict) -> str:
    if t.get("reused"):
        return "  (reused)"
    return f"  ({t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s cpu)"


@dataclass(frozen=True)
class StageJob:
    """One stage to run, picklable so that a worker process can run it: the spec, what enters its fingerprint
    beyond the spec, and for a masked stage the mask file (and the SHA-256 of its bits, checked on load)."""

    spec: StageSpec
    extra_record: dict | None = None
    mask_path: str | None = None
    mask_sha256: str | None = None
    allow_full: bool = False
    measure: bool = False  # a worker that ran it also measures it against θ0
    probe: bool = False  # a full run that records a probe of its first steps (extra_record: full_run_extra)


@dataclass(frozen=True)
class SamplesJob:
    """θ0's own samples (:func:`rlsubnet.lab.pretrain.run_samples`) as a node of the plan."""

    spec: SampleSpec


def execute_job(job: StageJob | SamplesJob, kwargs: dict):
    """Run ``job`` in this process (``kwargs``: the rest of :func:`rlsubnet.lab.stages.run_stage`'s arguments)."""
    if isinstance(job, SamplesJob):
        return run_samples(job.spec, kwargs["base_dir"], kwargs["out_dir"], progress=kwargs["progress"])
    if job.mask_path is not None:
        if job.mask_sha256 is None:
            raise ValueError(f"stage {job.spec.name}: a masked job must carry the SHA-256 of its mask's bits")
        return run_masked_stage(
            job.spec,
            mask_path=job.mask_path,
            mask_sha256=job.mask_sha256,
            allow_full=job.allow_full,
            extra_record=job.extra_record,
            **kwargs,
        )
    if job.probe:
        from rlsubnet.predict.lab_probe import run_stage_with_probe

        return run_stage_with_probe(job.spec, extra_record=job.extra_record, **kwargs)
    return stages.run_stage(job.spec, extra_record=job.extra_record, **kwargs)


@dataclass
class PlannedStage:
    """A stage of the plan: its job, known up front, or ``prepare(done) -> StageJob | str`` called once the stages
    it ``needs`` have finished (a masked re-run needs the full run's mask); a str means skipped, and says why."""

    name: str
    job: StageJob | SamplesJob | str | None = None
    needs: tuple[str, ...] = ()
    prepare: Callable[[dict], StageJob | str] | None = None


@dataclass
class StageContext:
    """What every finetuning stage of one demo run shares; :meth:`run_plan` runs the stages of a plan, in worker
    processes when ``jobs`` > 1.

    Whatever a hook changes must be described in ``extra_record``, which enters the fingerprint, so that a
    finished stage is reused only for the same mask and options.
    """

    folder: RunFolder
    theta0: Path
    base_digest: str
    samples_path: Path | None
    samples_digest: str | None
    eval_tasks: list
    theta0_accuracy: dict
    timings: dict
    fresh: bool = False
    progress: bool = True
    jobs: int = 1
    threads: int = 1
    pool: WorkerPool | None = None  # started by the caller (else here, when a stage first needs it)
    measured: dict = field(default_factory=dict)  # name -> measurements made by the worker that ran the stage

    def _kwargs(self, job: StageJob | SamplesJob, progress: bool) -> dict:
        name = "samples" if isinstance(job, SamplesJob) else job.spec.name
        own = isinstance(job, StageJob) and job.spec.uses_own_samples
        return dict(
            base_dir=self.theta0,
            out_dir=self.folder.stage_dir(name),
            samples_path=self.samples_path if own else None,
            eval_tasks=list(self.eval_tasks),
            progress=progress,
        )

    def lookup(self, spec: StageSpec | SampleSpec, extra_record: dict | None = None):
        """The finished stage if its folder holds this spec's result for these inputs, else None."""
        if isinstance(spec, SampleSpec):
            return self.folder.finished("samples", samples_fingerprint(spec, self.base_digest))
        sdig = self.samples_digest if spec.uses_own_samples else None
        return self.folder.finished(spec.name, stages.stage_fingerprint(spec, self.base_digest, sdig, extra_record))

    def _finished(self, job, res) -> None:
        if isinstance(job, SamplesJob):
            self.samples_path = res.dir / "samples.jsonl"
            self.samples_digest = stages.file_digest(self.samples_path)

    def _result_line(self, res, label: str = "") -> str:
        if res.name == "samples":
            r = res.record
            return (
                f"    {label}sample accuracy {r['sample_accuracy']:.1%}; {r['prompts_with_a_correct_sample']} prompts "
                f"with a correct sample, {r['prompts_with_correct_and_incorrect']} with both"
                + time_note(self.timings[res.name])
            )
        accs = ", ".join(
            f"{t} {self.theta0_accuracy[t]['bf16']['accuracy']:.1%} -> {v['bf16']['accuracy']:.1%}"
            for t, v in res.record["accuracy"].items()
        )
        return f"    {label}held-out accuracy {accs}" + time_note(self.timings[res.name])

    def run_plan(self, plan: list, *, first_number: int, total: int) -> tuple[dict, dict]:
        """Run every stage of ``plan`` (in order, each once the stages it needs are done), reusing finished ones;
        ``jobs`` > 1 runs that many at a time in worker processes (spawned; one torch thread count each).
        Returns ({name: StageResult}, {name: why skipped})."""
        done: dict = {}
        skipped: dict[str, str] = {}
        pending = list(plan)
        number = {node.name: first_number + i for i, node in enumerate(plan)}
        running: dict = {}
        own_pool = self.pool is None and self.jobs > 1
        if own_pool:
            self.pool = WorkerPool(self.jobs, self.threads)

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
                        node.job = f"needs {', '.join(missing)}, which did not run" if missing else node.prepare(done)
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
                        done[node.name] = self._run_here(node.name, job)
                        progressed = True
                        break  # rescan in plan order: the stage may have unblocked others
                    res = self.lookup(job.spec, getattr(job, "extra_record", None))
                    if res is not None:
                        pending.remove(node)
                        done[node.name] = res
                        self._finished(job, res)
                        self.timings[node.name] = {"reused": True}
                        header(node)
                        say(self._result_line(res), self.progress)
                        progressed = True
                        continue
                    if len(running) >= self.jobs:
                        continue
                    assert self.pool is not None
                    pending.remove(node)
                    header(node, f"  (started in a worker process; {len(running) + 1} running)")
                    running[self.pool.get().submit(_worker_run, job, self._kwargs(job, False))] = node
                    progressed = True
                if self.jobs == 1 or not running:
                    if pending and not progressed:
                        raise RlsubnetError(f"cannot schedule {', '.join(n.name for n in pending)}: unmet needs")
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    node = running.pop(fut)
                    res, timing, measured = fut.result()
                    done[node.name] = res
                    self._finished(node.job, res)
                    self.timings[node.name] = timing
                    if measured is not None:
                        self.measured[node.name] = measured
                    say(self._result_line(res, f"{node.name}: "), self.progress)
        except BaseException:
            if self.pool is not None:
                self.pool.stop()
            raise
        finally:
            if own_pool and self.pool is not None:
                self.pool.close()
                self.pool = None
        return done, skipped

    def _run_here(self, name: str, job: StageJob | SamplesJob):
        res = self.lookup(job.spec, getattr(job, "extra_record", None))
        clock = Stopwatch()
        if res is None:
            res = execute_job(job, self._kwargs(job, self.progress))
            self.timings[name] = clock.record(reused=False)
        else:
            self.timings[name] = {"reused": True}
        self._finished(job, res)
        say(self._result_line(res), self.progress)
        return res


def samples_fingerprint(spec: SampleSpec, base_digest: str) -> str:
    return stages.fingerprint({"samples": spec.to_json(), "base": base_digest})


# -- worker processes (jobs > 1)

_IN_JOB = False


class WorkerPool:
    """The worker processes of a run, started on first use and kept for every later job (spawned workers import
    torch and TRL once, seconds each); ``get`` starts them all at once so that their imports overlap."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self.executor: ProcessPoolExecutor | None = None
        self._started: list = []

    def get(self) -> ProcessPoolExecutor:
        if self.executor is None:
            # spawn, not fork: the parent has torch (and its thread pools) initialised, which fork does not survive.
            self.executor = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.threads,),
            )
            # A process is spawned per task submitted while the others are busy: one no-op each starts them all,
            # here, with the workers' malloc settings in their environment.
            with worker_environment():
                self._started = [self.executor.submit(int) for _ in range(self.jobs)]
        return self.executor

    def wait_ready(self) -> None:
        """Wait until the started workers have imported their libraries (their no-op has run)."""
        wait(self._started)
        self._started = []

    def stop(self) -> None:
        if self.executor is not None:
            _stop_pool(self.executor)
            self.executor = None

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


# glibc's malloc hands large blocks back to the system when they are freed (and maps blocks above 128 KiB afresh):
# a training step's short-lived multi-megabyte tensors then cost a page fault per 4 KiB, up to 13% of a GRPO step
# on the development machine (in a fresh process; less in a long-lived worker, where the demo's system time went
# from 56 to 27 s). The workers keep freed memory for reuse instead. It changes where tensors
# live, never what is computed (test_worker_processes_give_the_same_bits: the same bytes as --jobs 1). glibc reads these
# settings when a process starts, so they are set in the environment the workers are spawned with; other C
# libraries ignore them.
WORKER_MALLOC = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


@contextlib.contextmanager
def worker_environment():
    """The environment for spawning workers: :data:`WORKER_MALLOC` added to ``GLIBC_TUNABLES`` (settings already
    there come after, so they win); this process's environment is restored after."""
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{WORKER_MALLOC}:{before}" if before else WORKER_MALLOC
    try:
        yield
    finally:
        if before is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = before


def _worker_init(threads: int) -> None:
    # The parent decides when to stop: Ctrl-C reaches it, and it stops the workers with SIGTERM, which interrupts a
    # running stage the way Ctrl-C does (its temporary folder is removed) and ends an idle worker quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_stop)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    # Imported now, while the parent pretrains or plans, rather than by the first stage.
    import transformers  # noqa: F401
    import trl  # noqa: F401


def _worker_stop(signum, frame):
    if _IN_JOB:
        raise KeyboardInterrupt
    os._exit(1)


def _worker_run(job: StageJob | SamplesJob, kwargs: dict):
    global _IN_JOB
    stages.quiet_libraries()
    clock = Stopwatch()
    _IN_JOB = True
    try:
        res = execute_job(job, kwargs)
        measured = None
        if isinstance(job, StageJob) and job.measure:
            from rlsubnet.lab.spectrum import measure_finished

            measured = measure_finished(Path(kwargs["base_dir"]), res)
            if job.probe:  # its subnetwork predicted from the probe it recorded, while the other worker trains
                from rlsubnet.lab.predicting import score_stage

                measured["prediction"] = score_stage(Path(kwargs["base_dir"]), job.spec, res)
    finally:
        _IN_JOB = False
    return res, clock.record(reused=False, worker_pid=os.getpid()), measured


def _stop_pool(pool) -> None:
    """Interrupt the running stages (each removes its temporary folder) and wait for the workers to end."""
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
    return max(1, min(4, (os.cpu_count() or 1) // max(1, threads)))
