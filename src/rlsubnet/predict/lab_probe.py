"""A probe of a lab stage: its first K steps, run by the stage's own TRL trainer.

The probe is the stage with its steps cut to K (:func:`rlsubnet.lab.stages.run_stage`): the same seed and data
seed, hence the same first K batches in the same order and the same sampling, on the same optimizer (the lab's
constant schedule does not depend on the step count). A step pre-hook on that optimizer records the gradients
it is about to apply; the stage folder gets the probe's statistics (``probe.safetensors``) inside its atomic
write, so a probe folder is complete or absent, and a finished probe with the same fingerprint is reused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.predict.probe import GradientRecorder, ProbeStats, initial_hash, unique_named_parameters

PROBE_FILE = "probe.safetensors"


def probe_spec(spec, steps: int):
    """The spec of the probe of ``spec``: the same stage cut to ``steps`` optimizer steps."""
    k = limits.integer(steps, "probe steps", 2, spec.steps)
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-probe{k}",
        steps=k,
        snapshot_every=k,
        description=f"the first {k} of `{spec.name}`'s {spec.steps} steps: a probe for predicting its subnetwork",
    )


def full_run_id(spec, base_dir: str | Path, samples_path: str | Path | None = None) -> str:
    """The fingerprint the full (unmasked) stage ``spec`` records in its stage.json: the run a probe belongs to."""
    from rlsubnet.lab import stages

    samples_digest = stages.file_digest(samples_path) if spec.uses_own_samples and samples_path else None
    return stages.stage_fingerprint(spec, stages.model_digest(base_dir), samples_digest)


def probe_stage(
    spec,
    steps: int,
    *,
    base_dir: str | Path,
    out_dir: str | Path,
    samples_path: str | Path | None = None,
    eval_tasks=None,
    progress: bool = False,
    overwrite: bool = False,
) -> ProbeStats:
    """Run the first ``steps`` steps of the lab stage ``spec`` from θ0 (``base_dir``) into the stage folder
    ``out_dir`` and return the probe's statistics (also in ``out_dir/probe.safetensors``). A folder that already
    holds this probe (same fingerprint) is reused. Its steps are the full run's first steps bit for bit when it
    runs with the same torch thread count (the demo's ``--threads``)."""
    from rlsubnet.lab import stages
    from rlsubnet.lab.trainers import default_optimizer

    out_dir = Path(out_dir)
    pspec = probe_spec(spec, steps)
    if spec.uses_own_samples and samples_path is None:
        raise UsageError(f"stage {spec.name}: its probe needs θ0's own samples ({spec.data}); pass samples_path")
    run_id = full_run_id(spec, base_dir, samples_path)
    extra = {"probe": {"of": spec.name, "steps": pspec.steps, "full_steps": spec.steps, "run_id": run_id}}
    reused = _finished(out_dir, pspec, base_dir, samples_path, extra)
    if reused is not None and not overwrite:
        return reused
    held: dict = {}

    def optimizer_factory(model, args):
        params = unique_named_parameters(model)
        held["initial_hash"] = initial_hash(params)
        held["recorder"] = recorder = GradientRecorder(params)
        return recorder.attach(default_optimizer(model, args))

    def extra_files(folder: Path) -> None:
        recorder = held["recorder"]
        stats = recorder.stats(
            len(recorder.lrs),
            initial_hash=held["initial_hash"],
            run_id=run_id,
            source={"kind": "lab stage", "stage": spec.name, "spec": spec.to_json(), "probe_stage": pspec.name},
        )
        recorder.detach()
        stats.check(f"probe of stage {spec.name}")
        stats.save(folder / PROBE_FILE)

    stages.run_stage(
        pspec,
        base_dir=base_dir,
        out_dir=out_dir,
        samples_path=samples_path if spec.uses_own_samples else None,
        eval_tasks=eval_tasks,
        optimizer_factory=optimizer_factory,
        extra_files=extra_files,
        extra_record=extra,
        progress=progress,
        overwrite=overwrite,
    )
    return ProbeStats.load(out_dir / PROBE_FILE)


def _finished(out_dir: Path, pspec, base_dir, samples_path, extra) -> ProbeStats | None:
    from rlsubnet.lab import stages

    if not (out_dir / "stage.json").is_file() or not (out_dir / PROBE_FILE).is_file():
        return None
    try:
        res = stages.StageResult.load(out_dir)
    except (OSError, ValueError, KeyError):
        return None
    samples_digest = stages.file_digest(samples_path) if pspec.uses_own_samples and samples_path else None
    want = stages.stage_fingerprint(pspec, stages.model_digest(base_dir), samples_digest, extra)
    return ProbeStats.load(out_dir / PROBE_FILE) if res.fingerprint == want else None
