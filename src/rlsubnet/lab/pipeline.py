"""The demo: reproduce the paper's measurements on a tiny language model, offline, with TRL's trainers.

    rlsubnet demo --out runs/demo                 # size small (~1M parameters), the default
    rlsubnet demo --out runs/micro --size micro --steps 4

θ0 (pretraining) and its samples come first; then the finetuning stages, the extra-seed full runs and the masked
re-runs of the subnetwork experiments (:mod:`rlsubnet.lab.subnet`), ``--jobs`` at a time in worker processes, each
re-run as soon as its full run has finished (:mod:`rlsubnet.lab.scheduler`). Each stage writes
``OUT/stages/<name>/`` atomically, so an interrupted run resumes from the last finished stages and a re-run reuses
every stage whose fingerprint (settings + inputs, the mask's bits for a masked stage) still matches.
``OUT/run.json`` records the configuration: a folder holding another configuration's results is refused unless
``--fresh`` (:mod:`rlsubnet.lab.runfolder`). The masks (``OUT/masks/``), the measurements
(:mod:`rlsubnet.lab.measure`) and the report (:mod:`rlsubnet.lab.report`, which renders results.json) are
recomputed on every run (seconds); the training is not.
"""

from __future__ import annotations

import functools
import os
import resource
from pathlib import Path
from typing import TypedDict

import torch

from rlsubnet import limits
from rlsubnet._version import __version__
from rlsubnet.lab import subnet
from rlsubnet.lab.config import DemoConfig, StageSpec
from rlsubnet.lab.measure import commuted_twins, measure_subnetwork
from rlsubnet.lab.predicting import PREDICTOR, measure_predictions, start_detailed
from rlsubnet.lab.pretrain import PretrainSpec, SampleSpec, run_pretrain
from rlsubnet.lab.progress import say
from rlsubnet.lab.report import prepare_report, summary_lines, write_report
from rlsubnet.lab.runfolder import RunFolder
from rlsubnet.lab.scheduler import (
    PlannedStage,
    SamplesJob,
    StageContext,
    StageJob,
    Stopwatch,
    WorkerPool,
    default_jobs,
    time_note,
)
from rlsubnet.lab.spectrum import measure_finished, random_reference
from rlsubnet.lab.stages import fingerprint, model_digest, quiet_libraries
from rlsubnet.predict.lab_probe import full_run_extra

# -- what runs


def pretrain_spec(cfg: DemoConfig) -> PretrainSpec:
    s = cfg.sized()
    return PretrainSpec(
        size=cfg.size,
        tasks=tuple(cfg.tasks),
        seed=cfg.seed,
        learning_rate=s.pretrain_lr,
        batch_size=s.pretrain_batch,
        max_steps=s.pretrain_max_steps,
        eval_every=s.pretrain_eval_every,
        target_accuracy=s.pretrain_target,
        threads=s.pretrain_threads,
    )


def sample_spec(cfg: DemoConfig) -> SampleSpec:
    return SampleSpec(task=cfg.task, k=cfg.samples_per_prompt, max_prompts=cfg.sized().sample_prompts, seed=cfg.seed)


class _CommonSettings(TypedDict):
    task: str
    steps: int
    batch_size: int
    seed: int
    snapshot_every: int
    num_generations: int


def finetune_specs(cfg: DemoConfig) -> list[StageSpec]:
    """The finetuning stages, all from θ0 with the same steps, batch, seed and data seed."""
    c, s = cfg, cfg.sized()
    common = _CommonSettings(
        task=c.task,
        steps=s.steps,
        batch_size=s.batch_size,
        seed=c.seed,
        snapshot_every=s.snapshot_every,
        num_generations=s.num_generations,
    )

    def grpo(
        name: str, description: str, *, lr=c.rl_lr, beta=0.0, clip=c.clip, task=c.task, optimizer="adamw"
    ) -> StageSpec:
        settings: _CommonSettings = {**common, "task": task}
        return StageSpec(
            name,
            "grpo",
            data="prompts",
            learning_rate=lr,
            beta=beta,
            max_grad_norm=clip,
            optimizer=optimizer,
            description=description,
            **settings,
        )

    def sft(name: str, data: str, lr: float, description: str, optimizer: str = "adamw") -> StageSpec:
        return StageSpec(
            name,
            "sft",
            data=data,
            learning_rate=lr,
            max_grad_norm=c.clip,
            optimizer=optimizer,
            description=description,
            **common,
        )

    specs = [
        grpo("grpo", "GRPO, exact-match reward, no KL term, gradient clipping"),
        grpo("grpo-kl", "GRPO with the KL term", beta=c.kl_beta),
        grpo("grpo-noclip", "GRPO without gradient clipping", clip=0.0),
        grpo(
            "grpo-sftlr", "GRPO at the usual SFT learning rate (the matched-lr control, from the RL side)", lr=c.sft_lr
        ),
        StageSpec(
            "dpo",
            "dpo",
            data="own-pairs",
            learning_rate=c.rl_lr,
            beta=c.dpo_beta,
            max_grad_norm=c.clip,
            description="DPO on θ0's own correct vs incorrect samples",
            **common,
        ),
        sft("sft", "gold", c.sft_lr, "SFT on reference answers at a usual SFT learning rate"),
        sft("sft-matched", "gold", c.rl_lr, "SFT on reference answers at the RL learning rate (matched-lr control)"),
        sft("rft", "own-correct", c.sft_lr, "rejection-sampling FT: SFT on θ0's own correct samples, usual SFT lr"),
        sft("rft-matched", "own-correct", c.rl_lr, "rejection-sampling FT at the RL learning rate"),
        # The optimizer as a cause of the sparsity: GRPO and SFT with plain SGD at one learning rate (config.SGD_LR)
        grpo("grpo-sgd", "GRPO with plain SGD (no momentum) instead of AdamW", lr=c.sgd_lr, optimizer="sgd"),
        sft("sft-sgd", "gold", c.sgd_lr, "SFT on reference answers with plain SGD, at grpo-sgd's learning rate", "sgd"),
    ]
    if c.second_task:
        second = c.second_task
        specs.append(grpo(f"grpo-task-{second}", f"GRPO on the second training set ({second})", task=second))
    return specs


def stage_plan(specs: list[StageSpec], prepare_rerun, samples: SamplesJob | None = None) -> list[PlannedStage]:
    """Every finetuning stage of the run, in the order they start: the stages above, the extra-seed full runs and
    the masked re-runs (``prepare_rerun(of, kind, done)`` makes their jobs once the full run ``of`` has finished),
    and, given ``samples``, θ0's samples, which the stages trained on them wait for.

    Longest first, the stages others wait for before their kind: ``grpo``, θ0's samples (short, and DPO and RFT
    need them), ``dpo``, the other GRPO stages (the long ones), DPO, SFT last, so that with two workers the short
    stages fill the end; with one, order does not matter. No stage's result depends on the order or on which
    process ran it."""
    spec_by_name = {s.name: s for s in specs}
    full_runs = [*specs, *subnet.extra_seed_specs(spec_by_name)]
    own = ("samples",) if samples is not None else ()
    plan = [
        PlannedStage(s.name, job=full_run_job(s, s.name in spec_by_name), needs=own if s.uses_own_samples else ())
        for s in full_runs
    ]
    if samples is not None:
        plan.insert(0, PlannedStage("samples", job=samples))
    algo = {s.name: s.algorithm for s in full_runs}
    for of in subnet.RERUN_OF:
        if of in spec_by_name:
            kinds = ("subnet", "random", "predicted") if of in subnet.PREDICTED_OF else ("subnet", "random")
            for kind in kinds:
                plan.append(
                    PlannedStage(f"{of}-{kind}", needs=(of,), prepare=functools.partial(prepare_rerun, of, kind))
                )
                algo[f"{of}-{kind}"] = spec_by_name[of].algorithm

    def priority(node):
        if node.name == "samples":
            return 0.5
        if node.name in subnet.RERUN_OF:
            return subnet.RERUN_OF.index(node.name)
        return {"grpo": 2, "dpo": 3, "sft": 4}[algo[node.name]]

    return sorted(plan, key=priority)


def stage_order(cfg: DemoConfig) -> list[str]:
    """The names of :func:`stage_plan`'s finetuning stages, in order (for tests and docs)."""
    return [n.name for n in stage_plan(finetune_specs(cfg), lambda *a: "")]


def full_run_job(spec: StageSpec, measure: bool) -> StageJob:
    """The job of a full run: it records a probe of its first steps (for the predictions) when it has 2 or more."""
    extra = full_run_extra(spec)
    return StageJob(spec, extra_record=extra, measure=measure, probe=extra is not None)


def plan_rerun(store: subnet.MaskStore, spec_by_name: dict, of: str, kind: str, done: dict) -> StageJob | str:
    """The job of the masked re-run ``of``-``kind`` (kind "subnet": on the full run's own mask; "random": on a random
    mask of equal density; "predicted": on the mask predicted from θ0, the plan and the probe of the run's first
    steps), made once the full run ``of`` is in ``done``; a str (why) when there is nothing to re-run."""
    full = done[of]
    mask = store.changed(of, full)
    if mask.changed == 0:
        return (
            f"`{of}` changed no bf16 entry at atol {subnet.MASK_ATOL:g}: its subnetwork is empty, there is "
            "nothing to re-run"
        )
    if kind == "predicted":
        if not (full.record.get("extra") or {}).get("probe"):
            return f"`{of}` recorded no probe (fewer than 2 steps): there is no prediction to train on"
        use = store.predicted(of, full, spec_by_name[of])
        if use.changed == 0:
            return f"the prediction for `{of}` is an empty mask: there is nothing to train"
        role = f"mask predicted before the run ({PREDICTOR} predictor, expected density)"
        key = subnet.predicted_mask_label(of)
    elif kind == "subnet":
        use, role, key = mask, "subnetwork of the full run", of
    else:
        use = store.random_like(of, full)
        role = f"random {subnet.RANDOM_SCOPE} mask of equal density"
        key = subnet.random_mask_label(of)
    return StageJob(
        subnet.rerun_spec(spec_by_name[of], kind),
        extra_record=subnet.mask_extra_record(use, role, of),
        mask_path=str(store.paths[key]),
        mask_sha256=use.bits_sha256(),
        allow_full=use.changed == use.numel,
    )


# -- the run


def run_demo(
    cfg: DemoConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, jobs: int | None = None
) -> dict:
    """Run (or resume) the whole demo and write the report; returns the results dict (results.json).

    ``jobs``: finetuning stages run at once, each in its own worker process (default :func:`default_jobs`);
    it changes the wall time, never a number."""
    cfg = cfg.resolved()
    jobs = default_jobs(cfg.threads) if jobs is None else limits.integer(jobs, "--jobs", 1, limits.MAX_JOBS)
    run_clock = Stopwatch()
    load_start = os.getloadavg()
    children_start = _children_cpu()
    # One thread by default: on a shared 2-core machine two OpenMP threads wait on each other far longer than they
    # save (we measured 3-7x slower steps under load), and a fixed count keeps the numbers reproducible.
    torch.set_num_threads(cfg.threads)
    quiet_libraries()
    workers = WorkerPool(jobs, cfg.threads) if jobs > 1 else None
    try:
        with RunFolder(out, cfg, fresh) as folder:
            return _run(cfg, folder, fresh, progress, jobs, workers, run_clock, load_start, children_start)
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    finally:
        if workers is not None:
            workers.close()


def _children_cpu() -> float:
    """CPU seconds of this process's finished (joined) child processes: the workers."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(
    cfg: DemoConfig,
    folder: RunFolder,
    fresh: bool,
    progress: bool,
    jobs: int,
    workers,
    run_clock,
    load_start,
    children_start: float,
) -> dict:
    """The run inside its folder (:func:`run_demo`)."""
    pre_spec, smp_spec, specs = pretrain_spec(cfg), sample_spec(cfg), finetune_specs(cfg)
    spec_by_name = {s.name: s for s in specs}
    n_plan = len(stage_order(cfg))
    n_total = 2 + n_plan
    timings: dict[str, dict] = {}
    say(
        f"rlsubnet demo: size {cfg.size}, task {cfg.task}"
        + (f" (+ {cfg.second_task})" if cfg.second_task else "")
        + f", seed {cfg.seed}, {n_plan} finetuning stages of {cfg.steps} steps, {jobs} at a time -> {folder.out}",
        progress,
    )

    # 1. θ0, which everything else waits for, on its own thread count. The workers start now and import their
    # libraries while this process imports its own and prepares the data; pretraining waits for them before its
    # first step, so that they do not compete with it. Its validation checks run in a worker when that leaves the
    # training its cores, inline otherwise (the same θ0 either way).
    say(f"[1/{n_total}] pretrain: {pre_spec.settings_line()}", progress)
    pre = folder.finished("pretrain", fingerprint({"pretrain": pre_spec.to_json()}))
    clock = Stopwatch()
    if pre is None:
        pool = workers.get() if workers is not None else None
        checks_beside = pre_spec.threads * 2 <= (os.cpu_count() or 1)
        pre = run_pretrain(
            pre_spec,
            folder.stage_dir("pretrain"),
            progress=progress,
            pool=pool if checks_beside else None,
            before_training=workers.wait_ready if workers is not None else None,
        )
        timings["pretrain"] = clock.record(reused=False)
    else:
        timings["pretrain"] = {"reused": True}
    acc = ", ".join(f"{t} {v['bf16']['accuracy']:.1%}" for t, v in pre.record["accuracy"].items())
    status = "reached" if pre.record["target_reached"] else "NOT reached"
    say(
        f"    θ0 after {pre.record['steps_done']} steps (target {status}); held-out accuracy {acc}"
        + time_note(timings["pretrain"]),
        progress,
    )
    theta0 = pre.model_dir
    base_digest = model_digest(theta0)

    # 2. θ0's own samples (for DPO and rejection-sampling FT), then the finetuning stages, the extra seeds and
    # the masked re-runs (the paper's Tables 3, 4): one plan, each stage as soon as what it needs is done
    ctx = StageContext(
        folder=folder,
        theta0=theta0,
        base_digest=base_digest,
        samples_path=None,
        samples_digest=None,
        eval_tasks=cfg.tasks,
        theta0_accuracy=pre.record["accuracy"],
        timings=timings,
        fresh=fresh,
        progress=progress,
        jobs=jobs,
        threads=cfg.threads,
        pool=workers,
    )
    store = subnet.MaskStore(folder.out, theta0, cfg.seed)
    clock = Stopwatch()
    plan = stage_plan(specs, functools.partial(plan_rerun, store, spec_by_name), SamplesJob(smp_spec))
    done, skipped = ctx.run_plan(plan, first_number=2, total=n_total)
    timings["finetuning_phase"] = clock.record(jobs=jobs, phase=True)
    smp = done["samples"]
    stages = {s.name: done[s.name] for s in specs}
    extra = {n.name: done[n.name] for n in plan if n.name in done and n.name not in stages and n.name != "samples"}

    # 3. measurements (those a worker made right after its stage are kept)
    say(f"[measure] compare engine on {len(stages)} stages (bf16 and fp32, snapshots, dynamics, spectra)", progress)
    clock = Stopwatch()
    # a worker that trained a full run also scored the prediction of its subnetwork: that goes to the predictions
    prescored = {n: m.pop("prediction") for n, m in ctx.measured.items() if "prediction" in m}
    measured = {
        name: ctx.measured[name] if name in ctx.measured else measure_finished(theta0, res)
        for name, res in stages.items()
    }
    spectral_random = random_reference(theta0)
    timings["measure"] = clock.record(reused=False, in_workers=sorted(ctx.measured))
    extra_specs = {n.name: n.job.spec for n in plan if isinstance(n.job, StageJob)}
    all_specs = {**extra_specs, **spec_by_name}
    # the predictors that need a seed + 1 run go to the idle workers now, beside the subnetwork measurements
    detailed = start_detailed(
        theta0, stages, extra, all_specs, cfg.seed, workers.executor if workers is not None else None
    )
    say("[subnetworks] masks, identity with θ_full, frozen fp32 masters, overlap against both chances", progress)
    clock = Stopwatch()
    for name, res in stages.items():  # every stage's mask in masks/ (its prediction is scored against it)
        store.changed(name, res)
    subnetwork = measure_subnetwork(theta0, folder.out, stages, extra, extra_specs, store, skipped, cfg)
    timings["subnetwork"] = clock.record(reused=False)
    say("[predictions] each subnetwork predicted from θ0, the plan and its run's first steps, scored", progress)
    clock = Stopwatch()
    prediction = measure_predictions(theta0, stages, extra, all_specs, store, cfg.seed, prescored, detailed)
    timings["prediction"] = clock.record(reused=False)

    results = {
        "rlsubnet_version": __version__,
        "config": cfg.to_json(),
        "theta0": {
            "dir": str(theta0),
            "digest": base_digest,
            **{
                k: pre.record[k]
                for k in (
                    "settings",
                    "parameters",
                    "steps_done",
                    "target_reached",
                    "reached_at_step",
                    "curve",
                    "accuracy",
                    "spec",
                )
            },
        },
        "samples": {
            k: smp.record[k]
            for k in (
                "settings",
                "prompts",
                "sample_accuracy",
                "prompts_with_a_correct_sample",
                "prompts_with_correct_and_incorrect",
            )
        },
        "stages": {
            name: {
                "spec": res.record["spec"],
                "settings": res.record["settings"],
                "description": spec_by_name[name].description,
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
        "prediction": prediction,
        "commuted_twins": commuted_twins(cfg.tasks),
        "spectral_reference": {"random_delta": spectral_random},
        "versions": pre.record["versions"],
        "timings": timings,
        "machine": {
            "cpu_count": os.cpu_count(),
            "jobs": jobs,
            "threads_per_stage": cfg.threads,
            "loadavg_start": list(load_start),
        },
    }

    # 5. the report: it renders results.json
    say("[report] figures, results.json, report.md", progress)
    clock = Stopwatch()
    # the workers, if they ran stages, are still there: they draw part of the figures
    figures = prepare_report(results, workers.executor if workers is not None else None)
    timings["report"] = clock.record(reused=False)
    if workers is not None:
        workers.close()  # joined, so that their CPU time (stages, checks, figures) is counted below
    total = run_clock.record()
    timings["total"] = {"wall_s": total["wall_s"], "cpu_s": total["cpu_s"] + _children_cpu() - children_start}
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    write_report(results, folder.out, figures)
    for line in summary_lines(results, results["claims"]):
        say(line, progress)
    say(f"done in {timings['total']['wall_s']:.0f} s: {folder.out / 'report.md'}", progress)
    return results
